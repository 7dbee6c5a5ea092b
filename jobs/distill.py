#!/usr/bin/env python
"""Distill a teacher into a student on Ray.

    python jobs/distill.py                                   # embedded default: local Ray, offline, minutes
    python jobs/distill.py --config configs/x.yaml [key.sub=value ...]
    ray job submit --working-dir . -- python jobs/distill.py --config configs/x.yaml

Phases: check config and models → tokenize + pack → teacher pass into the soft-target store →
DDP student training (with refresh when configured) → export → evaluation → report.
Re-running the same command resumes: committed shards are not re-scored, training continues
from its last checkpoint.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config (default: the embedded demo run)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    args = parser.parse_args(argv)

    from raydistill import RaydistillError, load_config, run

    try:
        if args.config:
            cfg = load_config(args.config, args.overrides)
        else:
            from raydistill.demo import default_config

            cfg = load_config(None, args.overrides, base=default_config())
        report = run(cfg)
    except RaydistillError as e:
        print(f"raydistill: {e}", file=sys.stderr)
        return 2
    ev = report.get("eval", {})
    print(f"\nraydistill: run {report['run']['name']!r} finished ({report['run']['mode']})")
    for label in ("teacher", "student_init", "student", "hard_label_student"):
        if label in ev:
            m = ev[label]
            extra = f", KL(teacher||student) {m['kl_teacher_student']:.4f}, top-1 agreement " \
                    f"{m['top1_agreement']:.3f}" if "kl_teacher_student" in m else ""
            print(f"  {label:<19} held-out CE {m['ce']:.4f}{extra}")
    print(f"  student:  {report['outputs']['student']}")
    print(f"  report:   {report['outputs']['report']} (+ report.md, plots)")
    print(f"  store:    {report['run']['store']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
