"""Rationale distillation end to end (issue 14): a student trained on the teacher's step-by-step working
answers held-out questions more accurately than the same student trained on the answers alone.

The task is 2-digit addition (arith_data). A small teacher is trained here, in-process and seeded, to
write its working before the answer; then two runs of the real pipeline (pipeline.run: Ray Data
generation + scoring passes, Ray Train fit, greedy-generation answer accuracy on the held-out questions)
over the same question file, with the same student shape, seed and step budget:

  rationale    the teacher writes every training response (greedy, arith_data.TEMPLATE), CE + token KD
  answer-only  the file's own responses ("A:<sum>"), CE only

Sizes are small enough for a test and keep a clear seeded gap (calibrated on a loaded 2-core machine;
measured values in the assertions' comments). bench/rationale_rows.py runs the comparison at larger sizes.
"""
from __future__ import annotations

import pytest

import arith_data

# A 2 x 64 GPT-2 teacher, 700 steps of 32 in plain torch (~1 min). Students: 300 steps gave the rationale
# student 0.33, 400 steps 0.55-0.65 (answer-only ~0.06 at both): 400 keeps the gap wide.
TEACHER = dict(steps=700, batch=32, n_embd=64, lr=5e-3, seed=1)
ROWS = 600  # questions in the file; data.eval_fraction 0.2 of them are held out (120)
# The same 2 x 64 student in both arms (a 2 x 32 one reached 0.24 in 600 steps in the bench); no
# hard-label student beside the distilled one (run.compare_hard_labels would cost one more fit).
STUDENT = dict(student_steps=400, student_width=64, seed=0, workers=1, hard_labels=False)


@pytest.fixture(scope="module")
def reports(ray_session, tmp_path_factory):
    """{arm: report} of both runs, the teacher trained first (cached in this module's tmp dir only)."""
    from raydistill.pipeline import run

    root = tmp_path_factory.mktemp("rationale-e2e")
    tok = arith_data.make_char_tokenizer(str(root / "tok"))
    # The teacher learns from questions the file does not hold: its held-out accuracy is generalisation.
    arith_data.train_teacher(str(root / "teacher"), tok, arith_data.pairs()[2000:], **TEACHER)
    corpus = arith_data.write_corpus(str(root / "qa.parquet"), arith_data.pairs()[:ROWS])
    out = {}
    for arm, rationale in (("rationale", True), ("answer_only", False)):
        cfg = arith_data.run_config(arm, str(root / "teacher"), corpus, str(root / arm), rationale=rationale,
                                    **STUDENT)
        out[arm] = run(cfg)
        ev = out[arm]["eval"]
        print(arm, {k: ev[k].get("answer_accuracy") for k in ("teacher", "student")}, ev.get("answers"),
              out[arm]["phases"])
    return out


@pytest.mark.slow
def test_rationale_student_beats_answer_only(reports):
    r_ev, a_ev = reports["rationale"]["eval"], reports["answer_only"]["eval"]
    inputs = reports["rationale"]["inputs"]
    assert inputs["train_rows"] + inputs["eval_rows"] == ROWS, inputs
    # Both arms ask the same held-out questions, and every one has its gold answer.
    held_out = {"prompts": inputs["eval_rows"], "matched": inputs["eval_rows"]}
    assert r_ev["answers"] == a_ev["answers"] == held_out, (r_ev["answers"], a_ev["answers"])
    teacher, r, a = (r_ev["teacher"]["answer_accuracy"], r_ev["student"]["answer_accuracy"],
                     a_ev["student"]["answer_accuracy"])
    # Measured (seeds above; equal in two runs of one tree, moving a little as train's reader changed):
    # teacher 1.000, rationale / answer-only 0.550 / 0.058 (2026-12-02 08:05 tree), 0.608 / 0.067 and
    # 0.650 / 0.067 (earlier trees); teacher seed 2 and student seed 1: 1.000, 0.675 / 0.050.
    assert teacher >= 0.9, teacher
    assert r >= a + 0.3 and r >= 4 * a, (r, a)


@pytest.mark.slow
def test_generation_pass_wrote_one_rationale_per_training_question(reports):
    from raydistill.store import SoftTargetStore

    rep = reports["rationale"]
    gen = rep["teacher_passes"][0]
    train_questions = rep["inputs"]["train_rows"]
    assert gen["source"] == "teacher_generated" and gen["complete"], gen
    assert gen["prompts"] == train_questions and gen["rows"] == train_questions * 1  # num_return_sequences 1
    shards = SoftTargetStore(rep["run"]["store"]).manifest()["inputs"]["shards"]
    assert {rec["source"] for rec in shards.values()} == {"teacher_generated"}
    assert sum(rec["rows"] for rec in shards.values()) == train_questions
    # The answer-only arm trains on the file's own rows: no generation pass.
    assert all(p["source"] != "teacher_generated" for p in reports["answer_only"]["teacher_passes"])
