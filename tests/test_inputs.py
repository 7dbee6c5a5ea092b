"""The input build's two readers: small corpora are packed in the driver, large ones through Ray
Data; one packing function, so both must give the very same rows, seq_ids, eval split and shards."""
from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from raydistill import data
from raydistill.data import build_inputs
from raydistill.models import preflight
from raydistill.pipeline import open_store

import tiny
from test_teacher_pass import make_cfg

N_DOCS = 700  # three batches of DOCS_PER_BATCH documents, the last one partial


@pytest.fixture(scope="module")
def long_corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("long-corpus") / "corpus.parquet"
    return tiny.write_corpus(str(path), tiny.corpus_texts(N_DOCS, seed=11))


def _build(tmp_path, tiny_dir, corpus, name, **over):
    cfg = make_cfg(tmp_path / name, tiny_dir, corpus, data__eval_fraction=0.2, targets__shard_rows=64, **over)
    info = preflight(cfg)
    store = open_store(cfg, info)
    return build_inputs(cfg, store, info), store


def _rows(store, rel_path) -> tuple[np.ndarray, np.ndarray]:
    table = pq.read_table(store.full_path(rel_path), filesystem=store.filesystem)
    ids = np.stack(table["input_ids"].to_numpy(zero_copy_only=False)) if table.num_rows else np.zeros((0,))
    return table["seq_id"].to_numpy(), ids


def test_driver_and_ray_data_readers_give_the_same_inputs(ray_session, tmp_path, tiny_dir, long_corpus,
                                                           monkeypatch):
    assert N_DOCS > 2 * data.DOCS_PER_BATCH
    fs, files, fmt = data.resolve_corpus(make_cfg(tmp_path, tiny_dir, long_corpus).data)
    small = make_cfg(tmp_path, tiny_dir, long_corpus).data
    assert data.in_process(fs, files, fmt, small)  # a 700-document corpus is packed in the driver

    driver, store_d = _build(tmp_path, tiny_dir, long_corpus, "driver", data__max_rows=650)
    monkeypatch.setattr(data, "IN_PROCESS_MAX_BYTES", 0)
    monkeypatch.setattr(data, "IN_PROCESS_MAX_ROWS", 0)
    assert not data.in_process(fs, files, fmt, small)
    ray_data, store_r = _build(tmp_path, tiny_dir, long_corpus, "ray", data__max_rows=650)

    # the same counts: 650 documents read, ~700 tokens' leftover per batch dropped alike
    keep = ("docs", "skipped_rows", "train_rows", "eval_rows", "shards", "fingerprint")
    assert {k: driver[k] for k in keep} == {k: ray_data[k] for k in keep}
    assert driver["docs"] == 650 and driver["train_rows"] > 3 * 64 and driver["eval_rows"] > 0
    # the same shards, row for row: ids, seq_ids and the eval split (checksums of the files too)
    shards_d, shards_r = (s.manifest()["inputs"]["shards"] for s in (store_d, store_r))
    assert shards_d == shards_r and len(shards_d) == driver["shards"]
    for sid, rec in shards_d.items():
        seq_d, ids_d = _rows(store_d, rec["input"])
        seq_r, ids_r = _rows(store_r, rec["input"])
        assert (seq_d == seq_r).all() and (ids_d == ids_r).all() and ids_d.shape[1] == 16
    eval_d, eval_r = (_rows(s, s.manifest()["inputs"]["eval"]) for s in (store_d, store_r))
    assert (eval_d[0] == eval_r[0]).all() and (eval_d[1] == eval_r[1]).all()
    train_ids = np.concatenate([_rows(store_d, r["input"])[0] for r in shards_d.values()])
    assert sorted(np.concatenate([train_ids, eval_d[0]]).tolist()) == list(range(driver["train_rows"] +
                                                                                 driver["eval_rows"]))


def test_driver_reader_matches_direct_packing(tmp_path, tiny_dir, long_corpus):
    """The driver's batches are DOCS_PER_BATCH consecutive documents, cut at max_rows (no Ray)."""
    cfg = make_cfg(tmp_path, tiny_dir, long_corpus, data__max_rows=600)
    fs, files, fmt = data.resolve_corpus(cfg.data)
    info = preflight(cfg)
    got = list(data.packed_in_process(cfg, fs, files, fmt, cfg.teacher.model, info.eos_token_id))
    texts = pq.read_table(long_corpus)["text"].to_pylist()[:600]
    kw = dict(tokenizer_path=cfg.teacher.model, trust_remote_code=False, text_column="text",
              seq_len=cfg.data.seq_len, eos_id=info.eos_token_id)
    want = [data.tokenize_and_pack({"text": texts[lo:lo + data.DOCS_PER_BATCH]}, **kw)
            for lo in range(0, 600, data.DOCS_PER_BATCH)]
    assert [int(b["docs"].sum()) for b in got] == [256, 256, 88]
    for g, w in zip(got, want, strict=True):
        assert (g["input_ids"] == w["input_ids"]).all() and (g["valid"] == w["valid"]).all()


def test_reader_choice_by_size(tmp_path, tiny_dir, long_corpus):
    """Parquet with a small max_rows, or small files, stay in the driver; big files go to Ray Data."""
    cfg = make_cfg(tmp_path, tiny_dir, long_corpus)
    fs, files, fmt = data.resolve_corpus(cfg.data)
    assert data.in_process(fs, files, fmt, cfg.data)
    size = __import__("os").path.getsize(files[0])
    big = data.IN_PROCESS_MAX_BYTES // size + 1  # that many copies of the file exceed the limit
    assert not data.in_process(fs, files * big, fmt, cfg.data)
    limited = make_cfg(tmp_path, tiny_dir, long_corpus, data__max_rows=data.IN_PROCESS_MAX_ROWS).data
    assert data.in_process(fs, files * big, fmt, limited)
    assert not data.in_process(fs, files * big, "json", limited)  # JSONL is read whole: size decides
