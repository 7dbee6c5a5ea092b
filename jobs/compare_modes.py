#!/usr/bin/env python
"""Run one distillation three ways and print one table: online vs cached vs mixed.

    python jobs/compare_modes.py                          # the embedded demo task (raydistill.demo)
    python jobs/compare_modes.py --quick                  # a few steps per mode: a smoke run
    python jobs/compare_modes.py --config configs/x.yaml train.max_steps=200 refresh.every_steps=10
    python jobs/compare_modes.py --modes cached,mixed refresh.source=on_policy

Modes (the same data, student, optimiser and steps; only where the soft targets come from differs):

    online   train.online=true        the teacher's forward runs inside every student step (baseline)
    cached   refresh.policy=none      one teacher pass before training, reused every epoch
    mixed    refresh.policy=round_robin, fraction 0.15, every_steps 50, source resample (defaults;
             `refresh.*` overrides on the command line change them): that share of the shards
             re-drawn every `refresh.every_steps` steps by the scheduler actor while training goes on

`key.sub=value` overrides apply to every mode (the keys that define a mode are set last). Each mode
gets its own output directory and store under --out-dir. The table: wall time of the run, teacher
forward tokens (initial + refresh passes, or the online forward of every step; evaluation excluded),
held-out cross-entropy and KL(teacher‖student) of the final student. Written to
bench/results/compare-<date>.json.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run from a checkout

MODES = ("online", "cached", "mixed")
# Small shards so that a fraction of them is a meaningful unit on the demo's few hundred sequences.
# The hard-label student is the demo's own comparison, not this one's.
COMMON = ["targets.shard_rows=32", "run.compare_hard_labels=false"]
# mixed: a sixth of the shards re-drawn every 50 steps — on the demo (~2 epochs) about halfway
# between cached (one pass) and online (a forward per step) in teacher compute.
MODE_DEFAULTS = {"online": [], "cached": [],
                 "mixed": ["refresh.policy=round_robin", "refresh.fraction=0.15", "refresh.source=resample",
                           "refresh.every_steps=50"]}
MODE_FORCED = {"online": ["train.online=true", "refresh.policy=none", "refresh.fraction=0"],
               "cached": ["train.online=false", "refresh.policy=none", "refresh.fraction=0"],
               "mixed": ["train.online=false"]}
QUICK = ["train.max_steps=24", "train.epochs=4", "train.log_every=4", "train.checkpoint_every=1000",
         "refresh.every_steps=3"]


def mode_config(mode: str, args, out_dir: str):
    from raydistill import load_config

    overrides = list(COMMON) + MODE_DEFAULTS[mode] + (QUICK if args.quick else []) + list(args.overrides)
    overrides += MODE_FORCED[mode] + [f"run.name=compare-{mode}", f"run.output_dir={out_dir}/{mode}",
                                      f"targets.store={out_dir}/{mode}/targets"]
    if args.config:
        return load_config(args.config, overrides)
    from raydistill.demo import default_config

    return load_config(None, overrides, base=default_config())


def summarize(mode: str, report: dict, wall: float) -> dict:
    ev, ph = report.get("eval", {}), report.get("phases", {})
    student = ev.get("student", {})
    ref = report.get("refresh") or {}
    return {"mode": mode, "wall_s": round(wall, 1),
            "distill_s": round(ph.get("teacher_pass", 0.0) + ph.get("train", 0.0), 1),
            "teacher_tokens": report["teacher_compute"]["total"], "teacher_compute": report["teacher_compute"],
            "ce": student.get("ce"), "kl": student.get("kl_teacher_student"),
            "top1": student.get("top1_agreement"), "teacher_ce": ev.get("teacher", {}).get("ce"),
            "steps": report["train"]["steps"], "train_tokens_per_s": report["train"]["tokens_per_s"],
            "refresh_passes": ref.get("passes"), "max_age_seen": ref.get("max_age_seen"),
            "bound_steps": ref.get("bound_steps"), "report": report["outputs"]["report"]}


def table(rows: list[dict]) -> str:
    head = f"{'mode':<8} {'wall s':>8} {'distill s':>9} {'teacher fwd tokens':>19} {'held-out CE':>12} " \
           f"{'KL(t||s)':>9} {'top-1':>6} {'refresh':>8} {'max age':>8}"
    lines = [head, "-" * len(head)]
    def f(v, spec):  # a missing figure is a right-aligned "-" of the column's width
        width = int("".join(ch for ch in spec.split(".")[0] if ch.isdigit()) or 0)
        return format(v, spec) if isinstance(v, (int, float)) else "-".rjust(width)

    for r in rows:
        lines.append(f"{r['mode']:<8} {f(r['wall_s'], '8.1f')} {f(r['distill_s'], '9.1f')} "
                     f"{f(r['teacher_tokens'], '19,d')} {f(r['ce'], '12.4f')} {f(r['kl'], '9.4f')} "
                     f"{f(r['top1'], '6.3f')} {f(r['refresh_passes'], '8d')} {f(r['max_age_seen'], '8d')}")
    teacher_ce = next((r["teacher_ce"] for r in rows if r.get("teacher_ce") is not None), None)
    if teacher_ce is not None:
        lines.append(f"teacher held-out CE {teacher_ce:.4f}")
    return "\n".join(lines)


def verdict(rows: list[dict]) -> list[str]:
    """How much of the cached→online gap mixed closes, and at what share of online's teacher compute."""
    by = {r["mode"]: r for r in rows}
    if not all(m in by for m in MODES):
        return []
    out = []
    for key, label in (("ce", "held-out CE"), ("kl", "KL(teacher||student)")):
        c, o, m = by["cached"][key], by["online"][key], by["mixed"][key]
        if None in (c, o, m):
            continue
        gap = c - o
        if abs(gap) < 1e-9:
            out.append(f"{label}: cached and online are equal ({c:.4f}); nothing to close")
        else:
            out.append(f"{label}: mixed closes {100 * (c - m) / gap:.0f}% of the cached→online gap "
                       f"(cached {c:.4f}, mixed {m:.4f}, online {o:.4f})")
    tok_o = by["online"]["teacher_tokens"]
    if tok_o:
        out.append(f"teacher forward tokens: cached {100 * by['cached']['teacher_tokens'] / tok_o:.0f}%, "
                   f"mixed {100 * by['mixed']['teacher_tokens'] / tok_o:.0f}% of online's")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config (default: the embedded demo run)")
    parser.add_argument("--quick", action="store_true", help="a few steps per mode (smoke run)")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of online,cached,mixed")
    parser.add_argument("--out-dir", help="where the runs go (default runs/compare-<date-time>)")
    parser.add_argument("--results", default=os.path.join(ROOT, "bench", "results"),
                        help="directory for compare-<date>.json")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides (all modes)")
    args = parser.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad:
        parser.error(f"--modes: unknown {bad}; choose from {', '.join(MODES)}")

    from raydistill import RaydistillError, run

    stamp = dt.datetime.now().strftime("%Y-%m-%d-%H%M%S")
    out_dir = os.path.abspath(args.out_dir or os.path.join("runs", f"compare-{stamp}"))
    try:
        cfgs = {m: mode_config(m, args, out_dir) for m in modes}  # every config error before any run
    except RaydistillError as e:
        print(f"compare_modes: {e}", file=sys.stderr)
        return 2
    from raydistill.cluster import init_ray

    init_ray(cfgs[modes[0]])  # once, before the clocks start: no mode pays for Ray's start
    rows = []
    for mode in modes:
        print(f"\n=== {mode} ===", flush=True)
        start = time.perf_counter()
        try:
            report = run(cfgs[mode])
        except RaydistillError as e:
            print(f"compare_modes: {mode}: {e}", file=sys.stderr)
            return 2
        rows.append(summarize(mode, report, time.perf_counter() - start))

    print("\n" + table(rows))
    notes = verdict(rows)
    for line in notes:
        print("  " + line)
    os.makedirs(args.results, exist_ok=True)
    path = os.path.join(args.results, f"compare-{dt.date.today().isoformat()}.json")
    if os.path.exists(path):
        path = path[:-5] + f"-{stamp[11:]}.json"
    import torch

    result = {"date": stamp, "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
              "quick": args.quick, "config": args.config or "embedded demo", "overrides": args.overrides,
              "out_dir": out_dir, "host": {"machine": platform.machine(), "cpus": os.cpu_count(),
                                           "cuda": torch.cuda.is_available()},
              "modes": rows, "verdict": notes, "mode_overrides": {m: MODE_DEFAULTS[m] + MODE_FORCED[m] for m in modes}}
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\nwritten: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
