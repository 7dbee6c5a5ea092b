"""The embedded demo's offline ingredients, on tiny sizes (no real teacher training here)."""
from __future__ import annotations

import hashlib
import os

import pyarrow.parquet as pq
import pytest

from raydistill import demo

TINY_BYTES = 150_000


def _sha(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("demo-cache"))


def test_corpus_is_stdlib_text_capped_and_deterministic(tiny_cache, tmp_path):
    path = demo.demo_corpus(tiny_cache, max_bytes=TINY_BYTES)
    assert path.endswith(".parquet") and os.path.isfile(path)
    texts = pq.read_table(path).column("text").to_pylist()
    assert len(texts) > 10
    assert all(isinstance(t, str) and t.strip() for t in texts)
    total = sum(len(t.encode("utf-8")) for t in texts)
    assert 0.5 * TINY_BYTES < total <= TINY_BYTES
    assert max(len(t) for t in texts) <= demo.CHUNK_MAX + 2000  # one long line may overshoot a little
    assert any("def " in t or "class " in t for t in texts)
    assert not any(name.startswith(".") for name in os.listdir(tiny_cache))  # no temp file left

    # cached: the second call returns the same file untouched; another cache builds the same bytes
    mtime = os.stat(path).st_mtime_ns
    assert demo.demo_corpus(tiny_cache, max_bytes=TINY_BYTES) == path
    assert os.stat(path).st_mtime_ns == mtime
    other = demo.demo_corpus(str(tmp_path / "other"), max_bytes=TINY_BYTES)
    assert _sha(other) == _sha(path)
    # a different cap is a different file
    assert demo.demo_corpus(tiny_cache, max_bytes=TINY_BYTES // 2) != path


def test_tokenizer_round_trips_code(tiny_cache):
    from transformers import AutoTokenizer

    corpus = demo.demo_corpus(tiny_cache, max_bytes=TINY_BYTES)
    tok_dir = demo.demo_tokenizer(tiny_cache, corpus, vocab_size=400)
    assert demo.demo_tokenizer(tiny_cache, corpus, vocab_size=400) == tok_dir
    tok = AutoTokenizer.from_pretrained(tok_dir)
    assert len(tok) == 400
    assert tok.eos_token == tok.bos_token == tok.unk_token == tok.pad_token == "<|endoftext|>"
    snippet = 'def f(x: int) -> str:\n    """Doc."""\n    return f"{x!r} é\\t"  # ok\n'
    ids = tok(snippet, add_special_tokens=False)["input_ids"]
    assert len(ids) < len(snippet.encode("utf-8"))  # merges learned from the corpus
    assert tok.decode(ids) == snippet


TINY_RECIPE = demo.DemoRecipe(corpus_bytes=TINY_BYTES, vocab_size=300, seq_len=32, student_rows=8,
                              teacher_layers=1, teacher_embd=16, teacher_heads=2, teacher_steps=6,
                              teacher_batch=4, teacher_warmup=2, teacher_eval_seqs=4, teacher_budget_s=20)


def test_teacher_trains_once_saves_hf_model_and_is_reused(tiny_cache, capsys):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = demo.demo_teacher(tiny_cache, recipe=TINY_RECIPE)
    assert os.path.basename(out).startswith("teacher-")
    assert os.path.isfile(os.path.join(out, "model.safetensors"))
    assert "teacher: step" in capsys.readouterr().out  # progress was logged
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.n_layer == 1 and model.config.n_embd == 16
    assert model.config.vocab_size == len(tok) == 300
    with torch.no_grad():
        logits = model(torch.tensor([tok("import os\n")["input_ids"]])).logits
    assert logits.shape[-1] == 300 and torch.isfinite(logits).all()
    assert not [n for n in os.listdir(tiny_cache) if n.startswith(".")]  # temp dir renamed away

    mtime = os.stat(os.path.join(out, "model.safetensors")).st_mtime_ns
    assert demo.demo_teacher(tiny_cache, recipe=TINY_RECIPE) == out
    assert "teacher: step" not in capsys.readouterr().out  # reused, not retrained
    assert os.stat(os.path.join(out, "model.safetensors")).st_mtime_ns == mtime
    # the student's part of the recipe does not retrain the teacher; the teacher's part does
    import dataclasses

    assert demo.demo_teacher(tiny_cache, recipe=dataclasses.replace(TINY_RECIPE, alpha=0.9)) == out
    other = demo.demo_teacher(tiny_cache, recipe=dataclasses.replace(TINY_RECIPE, teacher_steps=3))
    assert other != out and os.path.isfile(os.path.join(other, "model.safetensors"))


def test_default_config_shape(tiny_cache, monkeypatch):
    monkeypatch.setenv("RAYDISTILL_CACHE", tiny_cache)
    assert demo.cache_dir_default() == tiny_cache
    cfg = demo.default_config(recipe=TINY_RECIPE)
    assert set(cfg) == {"run", "data", "teacher", "targets", "student", "train", "refresh"}
    assert cfg["run"] == {"name": "demo", "output_dir": "runs/demo", "seed": 0, "compare_hard_labels": True}
    assert os.path.isfile(cfg["data"]["path"]) and cfg["data"]["max_rows"] == TINY_RECIPE.student_rows
    assert cfg["teacher"]["model"] == demo.demo_teacher(tiny_cache, recipe=TINY_RECIPE)
    assert cfg["targets"]["format"] == "sampled" and cfg["targets"]["samples"] == 50
    assert cfg["train"]["workers"] == 2 and 0 < cfg["train"]["alpha"] < 1
    assert set(cfg["student"]["init_from_teacher"]) == {"n_layer", "n_embd", "n_head"}
    assert cfg["refresh"] == {"policy": "none"}


def test_default_config_is_valid_for_the_config_module(tiny_cache):
    config = pytest.importorskip("raydistill.config")
    cfg = config.load_config(None, [], base=demo.default_config(tiny_cache, recipe=TINY_RECIPE))
    assert cfg.train.workers == 2 and cfg.data.max_rows == TINY_RECIPE.student_rows
