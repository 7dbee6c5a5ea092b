"""Teacher passes with real Ray Data actor pools and real HF models (GPT-2 and Llama families)."""
from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from raydistill.config import load_config
from raydistill.data import build_inputs
from raydistill.errors import ModelError, StoreError
from raydistill.models import load_causal_lm, preflight
from raydistill.pipeline import open_store, score_pending
from raydistill.targets import decode

import tiny


def make_cfg(tmp_path, tiny_dir, corpus, *, family="gpt2", fmt="topk", **over):
    overrides = [f"teacher.model={tiny_dir / (family + '-teacher')}", "student.init_from_teacher={n_layer: 1}",
                 f"data.path={corpus}", "data.seq_len=16", "data.eval_fraction=0.1",
                 f"targets.format={fmt}", "targets.k=8", "targets.samples=50", "targets.shard_rows=40",
                 "teacher.replicas=2", "teacher.cpus_per_replica=0.5", "teacher.batch_size=16",
                 f"run.output_dir={tmp_path / 'out'}"]
    overrides += [f"{k.replace('__', '.')}={v}" for k, v in over.items()]
    return load_config(None, overrides)


def dense_logprobs(model_dir, input_ids: torch.Tensor) -> torch.Tensor:
    model = load_causal_lm(str(model_dir))
    with torch.no_grad():
        return F.log_softmax(model(input_ids=input_ids).logits[:, :-1].float(), dim=-1)


def read_all(store):
    tables = [store.read_shard(sid) for sid in store.shard_ids()]
    import pyarrow as pa
    return pa.concat_tables(tables)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_topk_pass_matches_dense_teacher(ray_session, tmp_path, tiny_dir, tiny_corpus, family):
    cfg = make_cfg(tmp_path, tiny_dir, tiny_corpus, family=family, fmt="topk")
    info = preflight(cfg)
    store = open_store(cfg, info)
    inputs = build_inputs(cfg, store, info)
    n_train = inputs["train_rows"]
    assert n_train > 40 and inputs["shards"] == -(-n_train // 40)

    stats = score_pending(cfg, store, info)
    assert stats["rows"] == n_train and stats["shards"] == inputs["shards"]
    table = read_all(store)
    assert table.num_rows == n_train
    seq_ids = table["seq_id"].to_numpy()
    assert len(np.unique(seq_ids)) == n_train
    eval_ids = pq.read_table(store.full_path(store.manifest()["inputs"]["eval"]),
                             filesystem=store.filesystem)["seq_id"].to_numpy()
    assert not set(eval_ids) & set(seq_ids) and len(eval_ids) == inputs["eval_rows"]

    input_ids, targets = decode(table, "topk")
    logp = dense_logprobs(tiny_dir / f"{family}-teacher", input_ids)
    vals, idx = logp.topk(8, dim=-1)
    # ids equal torch.topk unless two log-probs tie within fp16 resolution
    same = (targets.ids == idx) | (torch.abs(targets.logprobs - vals) < 2e-3)
    assert same.float().mean() > 0.999
    assert torch.allclose(targets.logprobs, vals, atol=2e-2, rtol=1e-3)
    tail = torch.log1p(-vals.exp().sum(-1).clamp(max=1 - 1e-7))
    assert torch.allclose(targets.tail_logmass, tail, atol=2e-2, rtol=1e-2)
    label = logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    assert torch.allclose(targets.label_logprob, label, atol=2e-2, rtol=1e-3)

    # resume: a second pass over the same store scores nothing
    again = make_cfg(tmp_path, tiny_dir, tiny_corpus, family=family, fmt="topk")
    store2 = open_store(again, preflight(again))
    assert build_inputs(again, store2, info)["skipped"] is True
    assert score_pending(again, store2, info) is None
    assert all(store2.current(s)["version"] == 1 for s in store2.shard_ids())


def test_sampled_pass_counts_and_distribution(ray_session, tmp_path, tiny_dir, tiny_corpus):
    cfg = make_cfg(tmp_path, tiny_dir, tiny_corpus, fmt="sampled", targets__samples=200)
    info = preflight(cfg)
    store = open_store(cfg, info)
    build_inputs(cfg, store, info)
    score_pending(cfg, store, info)
    table = read_all(store)
    input_ids, targets = decode(table, "sampled")
    counts = torch.where(torch.isfinite(targets.logprobs), targets.logprobs.exp() * 200, torch.zeros(()))
    assert torch.allclose(counts.sum(-1), torch.full(counts.shape[:2], 200.0), atol=1e-3)
    # empirical distribution vs the dense teacher: every estimated p̂ within 5 standard errors
    logp = dense_logprobs(tiny_dir / "gpt2-teacher", input_ids)
    p = logp.exp().gather(-1, targets.ids)
    p_hat = counts / 200
    se = torch.sqrt(p * (1 - p) / 200).clamp(min=1e-3)
    valid = torch.isfinite(targets.logprobs)
    assert ((p_hat - p).abs() <= 5 * se + 1e-3)[valid].float().mean() > 0.999
    label = logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    assert torch.allclose(targets.label_logprob, label, atol=2e-2, rtol=1e-3)


def test_store_refuses_other_vocabulary(tmp_path, tiny_dir, tiny_corpus):
    cfg = make_cfg(tmp_path, tiny_dir, tiny_corpus)
    store = open_store(cfg, preflight(cfg))
    other_tok = tiny.make_tokenizer(str(tmp_path / "tok2"), tiny.corpus_texts(50, seed=9), vocab_size=300)
    tiny.make_gpt2(str(tmp_path / "other-teacher"), other_tok)
    other = make_cfg(tmp_path, tiny_dir, tiny_corpus, teacher__model=tmp_path / "other-teacher",
                     targets__store=store.uri)
    with pytest.raises(StoreError, match="tokenizer"):
        open_store(other, preflight(other))


def test_vocab_mismatch_refused_before_ray(tmp_path, tiny_dir, tiny_corpus):
    other_tok = tiny.make_tokenizer(str(tmp_path / "tok2"), tiny.corpus_texts(50, seed=9), vocab_size=300)
    tiny.make_gpt2(str(tmp_path / "other-student"), other_tok)
    cfg = make_cfg(tmp_path, tiny_dir, tiny_corpus, student__init_from_teacher="null",
                   student__model=tmp_path / "other-student")
    with pytest.raises(ModelError) as e:
        preflight(cfg)
    assert str(tiny_dir / "gpt2-teacher") in str(e.value) and str(tmp_path / "other-student") in str(e.value)
