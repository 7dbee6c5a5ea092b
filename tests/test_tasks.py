"""The task seam: `causal_lm` against the direct computations it replaces (real tiny HF models)."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from raydistill.config import Config, load_config
from raydistill.errors import ConfigError
from raydistill.evaluate import eval_input_ids, evaluate
from raydistill.targets import encode
from raydistill.tasks import TASKS, get_task
from raydistill.tasks.causal_lm import CausalLM


@pytest.fixture(scope="module")
def lm(tiny_dir):
    cfg = load_config(None, [f"teacher.model={tiny_dir / 'gpt2-teacher'}", "student.init_from_teacher={n_layer: 1}"])
    task = get_task(cfg)
    return cfg, task, task.load_model(str(tiny_dir / "gpt2-teacher"))


def _rows(vocab: int, n: int = 5, length: int = 9, id_type=pa.uint16()) -> tuple[pa.Table, np.ndarray]:
    ids = np.random.default_rng(0).integers(0, vocab, (n, length))
    table = pa.table({"seq_id": pa.array(np.arange(n) + 100, pa.int64()),
                      "input_ids": pa.array(ids.tolist(), pa.list_(id_type))})
    return table, ids


def test_registry_and_default():
    assert TASKS["causal_lm"] == "raydistill.tasks.causal_lm:CausalLM"
    assert Config().task == "causal_lm"
    assert isinstance(get_task(Config()), CausalLM)


def test_unknown_task_refused_before_ray(tiny_dir):
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"teacher.model={tiny_dir / 'gpt2-teacher'}", "student.init_from_teacher={n_layer: 1}",
                           "task=causal_llm"])
    assert "task: 'causal_llm' is not one of" in str(e.value) and "causal_lm" in str(e.value)


def test_inputs_logits_labels_match_the_direct_computation(lm):
    cfg, task, model = lm
    table, ids = _rows(model.config.vocab_size)
    assert task.input_schema(model.config.vocab_size) == pa.schema(
        [("seq_id", pa.int64()), ("input_ids", pa.list_(pa.uint16()))])
    inputs = task.inputs_from_arrow(table.slice(1, 3))   # a slice that does not start at row 0
    assert set(inputs) == {"input_ids"} and inputs["input_ids"].dtype == torch.int64
    assert torch.equal(inputs["input_ids"], torch.from_numpy(ids[1:4]))
    with torch.no_grad():
        got = task.logits(model, inputs)
        want = model(input_ids=torch.from_numpy(ids[1:4])).logits[:, :-1]
    assert got.shape == (3, 8, model.config.vocab_size) and torch.equal(got, want)
    assert torch.equal(task.labels(inputs), torch.from_numpy(ids[1:4, 1:]))


@pytest.mark.parametrize("fmt", ["topk", "sampled"])
def test_encode_targets_equals_targets_encode(lm, fmt):
    cfg, task, model = lm
    table, ids = _rows(model.config.vocab_size)
    params = {"format": fmt, "k": 4, "samples": 20, "capture_temperature": 1.0}
    inputs = task.inputs_from_arrow(table)
    with torch.no_grad():
        got = task.encode_targets(model, inputs, params=params, vocab_size=model.config.vocab_size,
                                  generator=torch.Generator().manual_seed(3))
        x = torch.from_numpy(ids)
        want = encode(model(input_ids=x).logits, x, fmt=fmt, k=4, samples=20, capture_temperature=1.0,
                      vocab_size=model.config.vocab_size, generator=torch.Generator().manual_seed(3))
    assert set(got) == set(want)
    for k in want:
        assert len(got[k]) == len(want[k]) == 5
        assert all(np.array_equal(a, b) for a, b in zip(got[k], want[k])), k


def test_evaluate_is_the_causal_lm_evaluation(lm, tiny_dir):
    cfg, task, teacher = lm
    student = task.build_student(seed=0)
    table, ids = _rows(teacher.config.vocab_size, n=7)
    got = task.evaluate(student, teacher, table, batch_size=3, max_rows=5)
    want = evaluate(student, teacher, eval_input_ids(table, max_rows=5), batch_size=3)
    assert got["eval_sequences"] == 5 and got["tokens"] == 5 * 8
    assert got["student"] == want["student"] and got["teacher"] == want["teacher"]


def test_build_student_is_seeded_and_smaller(lm):
    cfg, task, teacher = lm
    a, b, c = task.build_student(seed=0), task.build_student(seed=0), task.build_student(seed=1)
    assert a.config.n_layer == 1 and teacher.config.n_layer == 2
    wa, wb, wc = (m.transformer.h[0].attn.c_attn.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
