"""evaluate: CE / KL(teacher‖student) / top-1 agreement against a dense full-batch reference."""
from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F

from raydistill.evaluate import eval_input_ids, evaluate


@pytest.fixture(scope="module")
def models(tiny_dir):
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(str(tiny_dir / "gpt2-student"))
    teacher = AutoModelForCausalLM.from_pretrained(str(tiny_dir / "gpt2-teacher"))
    return student, teacher


@pytest.fixture(scope="module")
def ids(models):
    vocab = models[0].config.vocab_size
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (11, 13), generator=g)


def _reference(student, teacher, ids):
    """Full batch, written out directly: no batching, F.cross_entropy and F.kl_div."""
    student.eval()
    teacher.eval()
    with torch.no_grad():
        s = student(input_ids=ids).logits[:, :-1].float()
        t = teacher(input_ids=ids).logits[:, :-1].float()
    labels = ids[:, 1:]
    V = s.shape[-1]
    s_flat, t_flat = s.reshape(-1, V), t.reshape(-1, V)
    s_ce = F.cross_entropy(s_flat, labels.reshape(-1)).item()
    t_ce = F.cross_entropy(t_flat, labels.reshape(-1)).item()
    # [tokens, V] with batchmean = mean over tokens of KL(p_t ‖ q_s).
    kl = F.kl_div(F.log_softmax(s_flat, -1), F.log_softmax(t_flat, -1), log_target=True,
                  reduction="batchmean").item()
    agree = (s_flat.argmax(-1) == t_flat.argmax(-1)).double().mean().item()
    return s_ce, t_ce, kl, agree


def test_matches_dense_reference(models, ids):
    student, teacher = models
    s_ce, t_ce, kl, agree = _reference(student, teacher, ids)
    out = evaluate(student, teacher, ids, batch_size=4)
    assert out["tokens"] == 11 * 12
    assert set(out["student"]) == {"ce", "kl_teacher_student", "top1_agreement", "perplexity"}
    assert set(out["teacher"]) == {"ce", "perplexity"}
    assert out["student"]["ce"] == pytest.approx(s_ce, abs=1e-5)
    assert out["teacher"]["ce"] == pytest.approx(t_ce, abs=1e-5)
    assert out["student"]["kl_teacher_student"] == pytest.approx(kl, abs=1e-5)
    assert out["student"]["top1_agreement"] == pytest.approx(agree, abs=1e-9)
    assert out["student"]["perplexity"] == pytest.approx(math.exp(s_ce), rel=1e-5)
    assert out["teacher"]["perplexity"] == pytest.approx(math.exp(t_ce), rel=1e-5)
    assert out["student"]["kl_teacher_student"] > 0
    # Random tiny models with ~320 tokens: CE is near log V.
    assert abs(out["student"]["ce"] - math.log(student.config.vocab_size)) < 1.0


def test_batch_size_independent(models, ids):
    # 11 rows: batch 3 leaves a ragged last batch of 2, so a mean of batch means would differ.
    a = evaluate(*models, ids, batch_size=3)
    b = evaluate(*models, ids, batch_size=16)
    for part in ("student", "teacher"):
        for k, v in a[part].items():
            assert v == pytest.approx(b[part][k], abs=1e-5), (part, k)
    assert a["tokens"] == b["tokens"]


def test_model_against_itself(models, ids):
    teacher = models[1]
    out = evaluate(teacher, teacher, ids, batch_size=5)
    assert out["student"]["kl_teacher_student"] == pytest.approx(0.0, abs=1e-6)
    assert out["student"]["top1_agreement"] == 1.0
    assert out["student"]["ce"] == pytest.approx(out["teacher"]["ce"], abs=1e-6)


def test_missing_models_skip_their_part(models, ids):
    student, teacher = models
    only_s = evaluate(student, None, ids)
    assert set(only_s) == {"student", "tokens"}
    assert set(only_s["student"]) == {"ce", "perplexity"}
    only_t = evaluate(None, teacher, ids)
    assert set(only_t) == {"teacher", "tokens"}
    assert evaluate(None, None, ids) == {"tokens": 11 * 12}


def test_restores_training_mode(models, ids):
    student = models[0]
    student.train()
    evaluate(student, None, ids[:2])
    assert student.training
    student.eval()


def test_bad_shapes(models):
    with pytest.raises(ValueError, match="L >= 2"):
        evaluate(models[0], None, torch.zeros((2, 1), dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[N, L\]"):
        evaluate(models[0], None, torch.zeros((0, 4), dtype=torch.long))


@pytest.mark.parametrize("id_type", [pa.uint16(), pa.uint32()])
def test_eval_input_ids(id_type):
    rows = np.arange(20, dtype=np.int64).reshape(5, 4) + 60000
    table = pa.table({"seq_id": pa.array(range(5), pa.int64()),
                      "input_ids": pa.array(rows.tolist(), pa.list_(id_type))})
    t = eval_input_ids(table)
    assert t.dtype == torch.long and t.shape == (5, 4)
    assert torch.equal(t, torch.from_numpy(rows))
    assert torch.equal(eval_input_ids(table, max_rows=2), torch.from_numpy(rows[:2]))
    # Multi-chunk columns and slices that do not start at 0.
    chunked = pa.concat_tables([table.slice(0, 2), table.slice(2)])
    assert torch.equal(eval_input_ids(chunked.slice(1), max_rows=3), torch.from_numpy(rows[1:4]))
    assert eval_input_ids(table, max_rows=0).shape == (0, 0)


def test_eval_input_ids_rejects_bad_tables():
    ragged = pa.table({"input_ids": pa.array([[1, 2, 3], [4, 5]], pa.list_(pa.uint16()))})
    with pytest.raises(ValueError, match="different lengths"):
        eval_input_ids(ragged)
    with pytest.raises(ValueError, match="no 'input_ids' column"):
        eval_input_ids(pa.table({"text": ["a"]}))
    nulls = pa.table({"input_ids": pa.array([[1, 2], None], pa.list_(pa.uint16()))})
    with pytest.raises(ValueError, match="null"):
        eval_input_ids(nulls)
