"""Row 6: peak memory of a teacher pass and of training at corpus sizes 1x and 4x.

Each corpus size runs in its own child process (`python bench/memory_rows.py --child spec.json`)
that starts its own local Ray (`ray.init(num_cpus=8)`), so that every process of the run — the
driver, GCS, raylet, the Ray Data / teacher / Ray Train worker processes — is a descendant of the
child. The parent samples that process tree with psutil every `mem_interval_s` and sums, per sample:

  PSS  proportional set size: shared pages (torch's libraries, the plasma object store in
       /dev/shm) divided among the processes that map them, so the sum is the tree's real
       footprint. This is the row's number.
  RSS  resident set size: shared pages counted once per process (over-counts; reported beside).

The child writes the phase it is in ("idle" after Ray start, "teacher" = build_inputs +
score_pending, "train" = fit_student, "done") to a file the sampler reads; the peak of each
phase is kept, and the idle level (Ray + imports, before any work) is reported so the part that
the work adds can be compared too (the fixed Ray/torch footprint dominates the total at bench sizes).
Training runs the same number of steps at both sizes but, like every epoch, streams over all rows.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from common import BENCH, ROOT, Row, judge, log


def _tree(root_pid: int):
    import psutil

    try:
        root = psutil.Process(root_pid)
        return [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def sample(root_pid: int) -> dict:
    import psutil

    pss = rss = 0
    top = (0, "")
    n = 0
    by_name: dict[str, list] = {}
    for p in _tree(root_pid):
        try:
            m = p.memory_full_info()
            name = p.name()
            if name.startswith("ray::"):  # "ray::MapBatches(load_shards).submit" -> the task/actor
                name = name.split(".")[0]
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        n += 1
        pss += m.pss
        rss += m.rss
        if m.rss > top[0]:
            top = (m.rss, name)
        entry = by_name.setdefault(name, [0, 0])
        entry[0] += 1
        entry[1] += m.pss
    return {"pss": pss, "rss": rss, "procs": n, "top_rss": top[0], "top_name": top[1],
            "by_name": {k: {"procs": c, "pss_mib": round(b / 2**20)} for k, (c, b) in
                        sorted(by_name.items(), key=lambda kv: -kv[1][1])}}


def measure(spec: dict, interval_s: float, timeout_s: float) -> dict:
    """Run one child and sample its process tree until it exits."""
    phase_file = spec["phase_file"]
    with open(phase_file, "w") as f:
        f.write("start")
    spec_path = os.path.join(spec["work"], "spec.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    log_path = os.path.join(spec["work"], "child.log")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([BENCH, ROOT]))
    with open(log_path, "w") as out:
        child = subprocess.Popen([sys.executable, os.path.join(BENCH, "memory_rows.py"), "--child", spec_path],
                                 stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        peaks: dict[str, dict] = {}
        deadline = time.time() + timeout_s
        while child.poll() is None:
            if time.time() > deadline:
                child.kill()
                raise RuntimeError(f"memory child timed out after {timeout_s}s (log: {log_path})")
            try:
                with open(phase_file) as f:
                    phase = f.read().strip() or "start"
            except OSError:
                phase = "start"
            s = sample(child.pid)
            p = peaks.setdefault(phase, {"pss": 0, "rss": 0, "top_rss": 0, "top_name": "", "samples": 0,
                                         "procs": 0, "last_pss": 0})
            p["samples"] += 1
            p["last_pss"] = s["pss"]
            if s["pss"] > p["pss"]:
                p["by_name_at_peak"] = s["by_name"]  # which processes make up the phase's peak
            for k in ("pss", "rss", "procs"):
                p[k] = max(p[k], s[k])
            if s["top_rss"] > p["top_rss"]:
                p["top_rss"], p["top_name"] = s["top_rss"], s["top_name"]
            time.sleep(interval_s)
    if child.returncode != 0:
        with open(log_path) as f:
            tail = f.read()[-3000:]
        raise RuntimeError(f"memory child failed ({child.returncode}):\n{tail}")
    with open(spec["result"]) as f:
        result = json.load(f)
    return {"peaks": peaks, "child": result}


def run_row_6(sizes, assets: dict, work: str, details: dict) -> list[Row]:
    out = {}
    for mult in (1, 4):
        d = os.path.join(work, f"row6-{mult}x")
        os.makedirs(d, exist_ok=True)
        spec = {"work": d, "phase_file": os.path.join(d, "phase"), "result": os.path.join(d, "result.json"),
                "sizes": sizes.name, "docs": sizes.mem_docs * mult, "steps": sizes.mem_steps,
                "teacher": assets["teacher"], "corpus": assets["corpus"]}
        log(f"row 6: {mult}x corpus ({spec['docs']} documents) in a child process with its own Ray")
        out[mult] = measure(spec, sizes.mem_interval_s, timeout_s=900)
        pk = out[mult]["peaks"]
        log(f"row 6: {mult}x peaks (tree PSS): idle {pk.get('idle', {}).get('pss', 0) / 2**20:,.0f} MiB, "
            f"teacher {pk.get('teacher', {}).get('pss', 0) / 2**20:,.0f} MiB, "
            f"train {pk.get('train', {}).get('pss', 0) / 2**20:,.0f} MiB")
    details["row6"] = out
    rows = []
    for phase, label in (("teacher", "teacher pass peak PSS 4x vs 1x corpus"),
                         ("train", "training peak PSS 4x vs 1x corpus")):
        a, b = out[1]["peaks"].get(phase), out[4]["peaks"].get(phase)
        if not a or not b:
            rows.append(Row("6", label, None, None, "MiB", None, "<= 1.25", "FAIL", "phase not sampled"))
            continue
        idle1 = out[1]["peaks"].get("idle", {}).get("last_pss", 0)
        idle4 = out[4]["peaks"].get("idle", {}).get("last_pss", 0)
        w1, w4 = a["pss"] - idle1, b["pss"] - idle4
        ratio = b["pss"] / a["pss"]
        c1, c4 = out[1]["child"][phase], out[4]["child"][phase]
        n1, n4 = a.get("by_name_at_peak", {}), b.get("by_name_at_peak", {})
        grew = sorted(((n4.get(k, {}).get("pss_mib", 0) - n1.get(k, {}).get("pss_mib", 0), k) for k in set(n1) | set(n4)),
                      reverse=True)[:2]
        grew_txt = "; ".join(f"{k}: {n1.get(k, {}).get('procs', 0)} -> {n4.get(k, {}).get('procs', 0)} processes, "
                             f"{n1.get(k, {}).get('pss_mib', 0):,} -> {n4.get(k, {}).get('pss_mib', 0):,} MiB"
                             for d, k in grew if d > 50)
        rows.append(Row("6", label, a["pss"] / 2**20, b["pss"] / 2**20, "MiB", ratio, "<= 1.25",
                        judge(ratio, "<=", 1.25),
                        f"above idle: {w1 / 2**20:,.0f} -> {w4 / 2**20:,.0f} MiB (x{w4 / max(w1, 1):.2f}); "
                        f"RSS sum {a['rss'] / 2**20:,.0f} -> {b['rss'] / 2**20:,.0f} MiB; largest process "
                        f"{a['top_name']} {a['top_rss'] / 2**20:,.0f} -> {b['top_rss'] / 2**20:,.0f} MiB; "
                        f"{c1['tokens']:,} -> {c4['tokens']:,} tokens" + (f"; grew most at the peak: {grew_txt}" if grew_txt else "")))
    return rows


# ---------------------------------------------------------------------------------------- child

def child(spec_path: str) -> None:
    from common import FULL, QUICK, bench_config, init_ray, setup_env

    setup_env()
    with open(spec_path) as f:
        spec = json.load(f)
    sizes = FULL if spec["sizes"] == "full" else QUICK

    def phase(name: str) -> None:
        tmp = spec["phase_file"] + ".tmp"
        with open(tmp, "w") as f:
            f.write(name)
        os.replace(tmp, spec["phase_file"])

    from raydistill.data import build_inputs
    from raydistill.pipeline import open_store, preflight, score_pending
    from raydistill.train import fit_student, read_final_state

    import ray.train  # noqa: F401  (imports counted in the idle level, as in any driver)

    cfg = bench_config(sizes, teacher=spec["teacher"], corpus=spec["corpus"], out_dir=os.path.join(spec["work"], "run"),
                       name=f"mem-{os.getpid()}", docs=spec["docs"],
                       **{"train.max_steps": spec["steps"], "train.log_every": max(1, spec["steps"] // 2)})
    info = preflight(cfg)
    init_ray(8)
    time.sleep(2)
    phase("idle")
    time.sleep(2)
    res = {}
    phase("teacher")
    t = time.perf_counter()
    store = open_store(cfg, info)
    inputs = build_inputs(cfg, store, info)
    stats = score_pending(cfg, store, info)
    res["teacher"] = {"seconds": time.perf_counter() - t, "tokens": stats["tokens"], "rows": inputs["train_rows"],
                      "shards": stats["shards"]}
    phase("train")
    t = time.perf_counter()
    result, total = fit_student(cfg, store, info.vocab_size, label="mem")
    if result.error:
        raise result.error
    state = read_final_state(result)
    res["train"] = {"seconds": time.perf_counter() - t, "steps": state["step"], "tokens": stats["tokens"],
                    "rows": inputs["train_rows"]}
    phase("done")
    with open(spec["result"], "w") as f:
        json.dump(res, f)
    import ray

    ray.shutdown()


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        sys.path[:0] = [BENCH, ROOT]
        child(sys.argv[2])
    else:
        sys.exit("usage: memory_rows.py --child spec.json (run by bench/run.py)")
