"""Rationale vs answer-only training: held-out answer accuracy of the same student (issue 14).

    .venv/bin/python bench/rationale_rows.py [--teacher-steps 1500] [--teacher-width 64] [--student-steps 600] [--student-width 32] [--rows 1200]

The task is 2-digit addition (tests/arith_data.py). A small GPT-2 teacher (byte-level tokenizer, one
token per character) is trained here to write its working before the answer; it is cached under
bench/results/tmp/cache. Then two runs of the real pipeline (Ray Data passes, Ray Train) over the same
question/answer file, the same student shape, seed and step budget:

  rationale    generate.enabled: the teacher writes a rationale + answer for every training prompt
               (prompt_template arith_data.TEMPLATE, greedy), the rows are scored, the student trains
               on them with CE + token KD (alpha 0.5); run.compare_hard_labels adds the same student on
               those rows with CE only (alpha 0)
  answer-only  the dataset's own responses ("A:<sum>"), CE only (alpha 0)

Every student answers the held-out questions by greedy generation (raydistill.answers); the answer
is the text after rationale.answer_prefix. Prints the accuracies and rationale / answer-only.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import CACHE, ROOT, TMP, setup_env  # noqa: E402

setup_env()
sys.path.insert(0, os.path.join(ROOT, "tests"))


def teacher_dir(steps: int, width: int, seed: int) -> str:
    """The trained teacher (cached by its step count, width and seed)."""
    import arith_data

    path = os.path.join(CACHE, f"arith-teacher-{steps}-w{width}-s{seed}")
    if not os.path.exists(os.path.join(path, "config.json")):
        tok = arith_data.make_char_tokenizer(path + ".tok")
        start = time.perf_counter()
        _, loss = arith_data.train_teacher(path + ".tmp", tok, arith_data.pairs()[2000:], steps=steps, seed=seed,
                                           batch=32, n_embd=width,
                                           progress=lambda s, l: print(f"teacher step {s} loss {l:.3f}", flush=True))
        os.rename(path + ".tmp", path)
        print(f"teacher: {steps} steps in {time.perf_counter() - start:.0f} s, final loss {loss:.3f}", flush=True)
    return path


def main() -> None:
    import arith_data
    from raydistill.pipeline import run

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher-steps", type=int, default=1500)
    p.add_argument("--teacher-width", type=int, default=64)
    p.add_argument("--student-steps", type=int, default=600)
    p.add_argument("--student-width", type=int, default=32, help="n_embd of the 2-layer student (the test uses 64)")
    p.add_argument("--rows", type=int, default=1200)
    p.add_argument("--eval-fraction", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    root = os.path.join(TMP, f"rationale-{int(time.time())}")
    os.makedirs(root)
    teacher = teacher_dir(args.teacher_steps, args.teacher_width, 1)
    corpus = arith_data.write_corpus(os.path.join(root, "qa.parquet"), arith_data.pairs()[:args.rows])
    results = {}
    for name, rationale in (("rationale", True), ("answer_only", False)):
        start = time.perf_counter()
        cfg = arith_data.run_config(name, teacher, corpus, os.path.join(root, name), rationale=rationale,
                                    student_steps=args.student_steps, eval_fraction=args.eval_fraction,
                                    seed=args.seed, student_width=args.student_width)
        report = run(cfg)
        ev = report["eval"]
        results[name] = {k: ev[k].get("answer_accuracy") for k in ("teacher", "student", "hard_label_student")
                         if isinstance(ev.get(k), dict)}
        results[name].update(answers=ev.get("answers"), seconds=round(time.perf_counter() - start, 1))
        print(name, json.dumps(results[name]), flush=True)
    r, a = results["rationale"]["student"], results["answer_only"]["student"]
    print(f"teacher answer accuracy      {results['rationale']['teacher']:.3f}")
    print(f"rationale student (CE + KD)  {r:.3f}")
    print(f"rationale student (CE only)  {results['rationale']['hard_label_student']:.3f}")
    print(f"answer-only student (CE)     {a:.3f}")
    print(f"ratio rationale / answer-only: {r / a:.2f}" if a else "ratio: answer-only accuracy is 0")
    with open(os.path.join(root, "results.json"), "w") as f:
        json.dump(dict(results, args=vars(args)), f, indent=1)


if __name__ == "__main__":
    main()
