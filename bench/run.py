#!/usr/bin/env python
"""raydistill benchmarks: every performance claim as a ratio to a baseline measured in the same run.

    python bench/run.py --quick          # make bench-quick: tiny models, <= 10 min on 2 cores
    python bench/run.py                  # make bench: larger models and corpora
    python bench/run.py --quick --rows 1,2 --profile

Rows (see each module's docstring for the exact method):
  1  teacher pass (build_inputs + score_pending) vs a plain fwd + encode loop   teacher_rows.py
  2  teacher replica scaling 1 vs 2 vs N (= cores)                             teacher_rows.py
  3  Ray Train from the store vs a plain loop over in-memory batches           train_rows.py
  4  cached vs online epoch time against the theoretical ratio                 train_rows.py
  5  store bytes/token and fidelity, sampled N and topk k (32k vocabulary)     store_rows.py
  6  peak memory of a teacher pass and of training at 1x and 4x corpus         memory_rows.py
  7  GPU: the same on a GPU with a ~100M+ teacher (only where one is lent)
  8  the enforced staleness bound: train tok/s and stall share, refresh pool 1 vs 2 vs none  refresh_rows.py
     (not in the default set: `--rows 8`)
  9  128k vocabulary: fused head + loss vs full logits (train step memory/speed, teacher pass memory,
     growth 32k -> 256k), each figure from its own child process  vocab_rows.py (`--rows 9`)

Rows 1-4 share one local Ray (`ray.init(num_cpus=8)`); row 5 needs none; row 6 runs each corpus
size in a child process with its own Ray so that its whole process tree can be measured.
Prints one table and writes bench/results/<YYYY-MM-DD>.json (scratch files: bench/results/tmp/).
"""
from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import shutil
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (BENCH, FULL, QUICK, TMP, Row, cores, corpus_and_tokenizer, gpt2_dir, init_ray,  # noqa: E402
                    loadavg, log, machine, setup_env, table)

setup_env()


def gpu_row() -> Row:
    try:
        import torch

        if torch.cuda.is_available():
            return Row("7", "GPU", None, None, "", None, "-", "not run",
                       f"a GPU is visible ({torch.cuda.get_device_name(0)}) but the GPU row is not implemented yet")
    except Exception:  # noqa: BLE001
        pass
    return Row("7", "GPU (teacher ~100M+ bf16, rows 1-4)", None, None, "", None, "-", "not run",
               "not run: no GPU lent")


def write_results_md(result: dict, json_path: str) -> None:
    """bench/RESULTS.md: the latest complete run (all rows), as committed and quoted in the README."""
    m = result["machine"]
    lines = [f"# Benchmark results — {result['date']}", "",
             f"Command: `{result['command']}` (`make bench-quick` / `make bench`); raw figures: "
             f"`{os.path.relpath(json_path, BENCH)}`.", "",
             f"Machine: {m.get('nproc')} cores ({m.get('cpu_model')}), {m.get('ram_gib')} GiB, GPU: {m.get('gpu')}; "
             f"Python {m.get('python')}, torch {m.get('torch')}, Ray {m.get('ray')}. Wall {result['wall_s']:.0f} s; "
             f"load average {result['loadavg_start']} at the start, {result['loadavg_end']} at the end "
             "(a shared machine: read the ratios, not the absolute rates).", "",
             "Each row is a ratio to a baseline measured in the same run (see `bench/run.py` and each row's "
             "module docstring for the method).", "", result["table_md"], ""]
    with open(os.path.join(BENCH, "RESULTS.md"), "w") as f:
        f.write("\n".join(lines))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes: <= 10 minutes on a 2-core machine")
    ap.add_argument("--rows", default="1,2,3,4,5,6", help="comma-separated rows to run (2 needs 1, 3-4 need 1)")
    ap.add_argument("--profile", action="store_true",
                    help="py-spy the 1-replica teacher actor (row 2) and the Ray Train worker (row 3); "
                         "perturbs the timing on small machines")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/<date>.json)")
    args = ap.parse_args(argv)
    args.rows_given = args.rows != ap.get_default("rows")
    sizes = QUICK if args.quick else FULL
    wanted = {r.strip() for r in args.rows.split(",") if r.strip()}
    if wanted & {"2", "3", "4"}:
        wanted.add("1")

    started = time.time()
    for old in glob.glob(os.path.join(TMP, "run-*")):  # scratch of earlier runs (kept when a row failed)
        shutil.rmtree(old, ignore_errors=True)
    work = os.path.join(TMP, f"run-{time.strftime('%Y%m%d-%H%M%S')}")
    os.makedirs(work, exist_ok=True)
    load_start = loadavg()
    log(f"{sizes.name} bench, {cores()} cores, load average {load_start}; scratch {work}")
    corpus, tok = corpus_and_tokenizer(sizes, 2048)
    teacher = gpt2_dir(tok, n_layer=sizes.teacher_layers, n_embd=sizes.teacher_embd, n_head=sizes.teacher_heads,
                       n_positions=sizes.seq_len, seed=1, tag="teacher2k")
    assets = {"corpus": corpus, "tokenizer": tok, "teacher": teacher}
    rows: list[Row] = []
    details: dict = {"sizes": sizes.__dict__, "assets": assets, "errors": {}, "phase_s": {}}

    out = args.out or os.path.join(BENCH, "results", f"{datetime.date.today().isoformat()}.json")
    command = ("python bench/run.py" + (" --quick" if args.quick else "") +
               (f" --rows {args.rows}" if args.rows != "1,2,3,4,5,6" else "") + (" --profile" if args.profile else ""))
    meta = {"date": datetime.date.today().isoformat(),
            "started": datetime.datetime.fromtimestamp(started).isoformat(timespec="seconds"),
            "command": command, "mode": sizes.name, "machine": machine(), "loadavg_start": load_start}

    def save(final: bool = False) -> dict:
        """Written after every section, so that a run cut short still leaves its rows."""
        result = dict(meta, complete=final, wall_s=round(time.time() - started, 1), loadavg_end=loadavg(),
                      rows=[r.to_dict() for r in rows], table_md=table(rows, markdown=True), details=details)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(out + ".tmp", "w") as f:
            json.dump(result, f, indent=1, default=str)
        os.replace(out + ".tmp", out)
        return result

    def section(name, fn):
        t = time.time()
        try:
            rows.extend(fn())
        except Exception as e:  # noqa: BLE001 - one failing row must not hide the others
            traceback.print_exc()
            details["errors"][name] = f"{type(e).__name__}: {e}"
            rows.append(Row(name, "error", None, None, "", None, "-", "FAIL", f"{type(e).__name__}: {e}"[:300]))
        details["phase_s"][name] = round(time.time() - t, 1)
        save()
        log(f"section {name} done in {details['phase_s'][name]:.0f}s")

    if "5" in wanted:
        from store_rows import run_row_5

        section("5", lambda: run_row_5(sizes, work, details))
    if "1" in wanted:
        from teacher_rows import run_rows_1_2

        section("1-2", lambda: (init_ray(8), run_rows_1_2(sizes, assets, work, details, profile=args.profile))[1])
        if wanted & {"3", "4"} and "row1" in details:
            from train_rows import run_rows_3_4

            store_uri = os.path.join(work, "row1", "targets")
            section("3-4", lambda: run_rows_3_4(sizes, assets, work, details, store_uri, profile=args.profile))
        import ray

        if ray.is_initialized():
            ray.shutdown()
    if "6" in wanted:
        from memory_rows import run_row_6

        section("6", lambda: run_row_6(sizes, assets, work, details))
    if "8" in wanted:
        from refresh_rows import run_row_8

        section("8", lambda: (init_ray(8), run_row_8(sizes, assets, work, details))[1])
    if "9" in wanted:
        from vocab_rows import run_row_9

        section("9", lambda: run_row_9(sizes, work, details))
    rows.append(gpu_row())

    order = {"1": 0, "2": 1, "3": 2, "3b": 3, "4": 4, "5": 5, "6": 6, "7": 7, "8": 8, "9": 9}
    rows.sort(key=lambda r: order.get(r.row, 9 if "-" not in r.row else order.get(r.row[0], 9)))
    result = save(final=True)
    print()
    print(table(rows))
    print()
    print(result["table_md"])
    if args.out is None and not args.rows_given:
        write_results_md(result, out)
    print(f"\n{sizes.name} bench: {result['wall_s']:.0f}s wall, load average {load_start} -> {result['loadavg_end']} "
          f"on {cores()} cores; results in {out}")
    if not details["errors"]:
        shutil.rmtree(work, ignore_errors=True)  # checkpoints, stores; kept for a look when a row failed
    return 0 if not details["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
