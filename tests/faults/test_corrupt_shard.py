"""Shards damaged on disk after a teacher pass — bytes flipped, file truncated, file deleted — are
detected by their manifest checksum / size before training uses them, never trained on, reported,
and re-issued as a new version by the next teacher pass.

  * the train loader (`shard_reader.load_shards`, run by Ray Data inside every epoch) verifies each shard
    it reads and skips a damaged one: a DDP fit over a damaged store trains only on intact rows
    (checked with the RAYDISTILL_AUDIT_DIR seq_id audit);
  * `pipeline.score_pending` (the pass a run starts with, and a re-run resumes with) runs
    `store.verify_all`, reports and invalidates the damaged shards, and re-scores exactly those
    (new version v2); everything else keeps v1.
"""
from __future__ import annotations

import glob
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from raydistill import targets as tg
from raydistill.data import build_inputs
from raydistill.errors import CorruptShardError
from raydistill.models import preflight
from raydistill.pipeline import open_store, score_pending
from raydistill.store import SoftTargetStore
from raydistill.shard_reader import epoch_slices, load_shards
from raydistill.train import dataset_schema, fit_student, read_final_state

from test_teacher_pass import make_cfg


def flip(path):
    data = bytearray(open(path, "rb").read())
    for i in range(len(data) // 3, len(data) // 3 + 8):
        data[i] ^= 0x5A
    open(path, "wb").write(bytes(data))


def truncate(path):
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) - 100])


DAMAGE = {"flipped": (flip, "checksum mismatch"), "truncated": (truncate, "checksum mismatch"),
          "deleted": (os.remove, "file missing")}


def damage(store, shard_ids):
    """Damage one shard per kind; returns {shard_id: expected reason fragment}."""
    out = {}
    for sid, (kind, (fn, reason)) in zip(shard_ids, DAMAGE.items()):
        fn(store.full_path(store.current(sid)["path"]))
        out[sid] = reason
    return out


# ---------------------------------------------------------------- the loader, without Ray

def test_loader_skips_damaged_shards(tmp_path):
    """`load_shards` (the map step of the train dataset) returns only intact shards' rows."""
    targets = {"format": "topk", "k": 3, "capture_temperature": 1.0}
    store = SoftTargetStore.open(str(tmp_path / "s"), tokenizer={"name": "t", "vocab_size": 50, "hash": "h"},
                                 targets=targets)
    g = torch.Generator().manual_seed(0)
    for i, sid in enumerate(["a", "b", "c", "d"]):
        ids = torch.randint(0, 50, (5, 6), generator=g)
        enc = tg.encode(torch.randn(5, 6, 50, generator=g), ids, fmt="topk", k=3, vocab_size=50)
        table = tg.build_table(enc, seq_id=np.arange(5) + 10 * i, input_ids=ids, policy_version=-1,
                               fmt="topk", vocab_size=50)
        w = store.write_shard(sid, 1, table)
        store.commit(sid, 1, {**w, "teacher_rev": "r", "format": "topk", "params": {"k": 3, "capture_temperature": 1.0},
                              "produced_at_step": -1, "policy_version": -1})
    schema = dataset_schema("targets", "topk", 50)
    # a slice with a row_seed (shard_reader.epoch_slices): its rows, permuted the same way for the same
    # seed, each row whole (its ids travel with its seq_id)
    whole = load_shards(pa.table({"shard_id": ["a"]}), store_uri=store.uri, what="targets", schema=schema)
    part = lambda seed: load_shards(pa.Table.from_pylist([{"shard_id": "a", "start": 0, "stop": 5, "row_seed": seed}]),
                                    store_uri=store.uri, what="targets", schema=schema)
    assert part(7).equals(part(7)) and sorted(part(7)["seq_id"].to_pylist()) == list(range(5))
    assert [part(s)["seq_id"].to_pylist() for s in range(4)] != [list(range(5))] * 4
    by_id = dict(zip(whole["seq_id"].to_pylist(), whole["input_ids"].to_pylist()))
    assert all(by_id[i] == ids for i, ids in zip(part(7)["seq_id"].to_pylist(), part(7)["input_ids"].to_pylist()))
    bad = damage(store, ["b", "c", "d"])
    out = load_shards(pa.table({"shard_id": ["a", "b", "c", "d"]}), store_uri=store.uri, what="targets",
                       schema=schema)
    assert out.schema == schema and sorted(out["seq_id"].to_pylist()) == list(range(5))
    for sid, reason in bad.items():
        with pytest.raises(CorruptShardError, match=reason) as ei:
            store.read_shard(sid)
        assert ei.value.shard_id == sid and ei.value.version == 1 and sid in str(ei.value)
        one = load_shards(pa.table({"shard_id": [sid]}), store_uri=store.uri, what="targets", schema=schema)
        assert one.num_rows == 0 and one.schema == schema
    assert sorted(store.verify_all()) == ["b", "c", "d"]


# ---------------------------------------------------------------- real pass + DDP fit + repair

@pytest.mark.slow
def test_damaged_shards_never_trained_on_and_rescored(ray_session, tmp_path, tiny_dir, tiny_corpus,
                                                      monkeypatch, capsys):
    cfg = make_cfg(tmp_path, tiny_dir, tiny_corpus, fmt="sampled", targets__shard_rows=32, teacher__replicas=1,
                   train__workers=2, train__cpus_per_worker=0.5, train__batch_size=8, train__epochs=1,
                   train__checkpoint_every=100, train__log_every=5, train__warmup_steps=1,
                   run__name=f"corrupt-{os.getpid()}-{tmp_path.name}")
    info = preflight(cfg)
    store = open_store(cfg, info)
    inputs = build_inputs(cfg, store, info)
    first = score_pending(cfg, store, info)
    assert first["shards"] == inputs["shards"] >= 6 and first["damaged"] == {}
    shard_rows = {sid: pq.read_table(store.input_path(sid))["seq_id"].to_numpy() for sid in store.shard_ids()}
    victims = store.shard_ids()[1:4]
    reasons = damage(store, victims)
    bad_ids = set(np.concatenate([shard_rows[s] for s in victims]).tolist())

    # detected (before anything reads them for training)
    found = store.verify_all()
    assert sorted(found) == sorted(victims)
    for sid, reason in reasons.items():
        assert reason in found[sid] and f"shard {sid} v1" in found[sid]

    # a DDP fit over the damaged store: the loader skips the damaged shards, nothing of them is trained on
    # Each rank reads its own slice of epoch 0's rows (shard_reader.epoch_slices): the steps fit
    # inside the intact rows of the rank that lost the most.
    m_inputs = store.manifest()["inputs"]["shards"]
    slices = epoch_slices([(sid, m_inputs[sid]["rows"]) for sid in store.shard_ids()], 2, cfg.run.seed, 0)
    intact = [sum(p["stop"] - p["start"] for p in parts if p["shard_id"] not in victims) for parts in slices]
    steps = min(intact) // 8 - 1
    assert steps >= 4
    audit = tmp_path / "audit"
    monkeypatch.setenv("RAYDISTILL_AUDIT_DIR", str(audit))
    cfg_fit = make_cfg(tmp_path, tiny_dir, tiny_corpus, fmt="sampled", targets__shard_rows=32,
                       train__workers=2, train__cpus_per_worker=0.5, train__batch_size=8, train__epochs=1,
                       train__max_steps=steps, train__checkpoint_every=100, train__log_every=5,
                       train__warmup_steps=1, run__name=f"corrupt-{os.getpid()}-{tmp_path.name}")
    result, total = fit_student(cfg_fit, store, info.vocab_size)
    assert result.error is None and total == steps and read_final_state(result)["step"] == steps
    trained = [np.load(f) for f in glob.glob(str(audit / "student-rank*-epoch0-*.npy"))]
    assert len(trained) == 2
    trained_ids = np.concatenate(trained)
    assert len(trained_ids) == steps * 8 * 2 == len(np.unique(trained_ids))
    assert not set(trained_ids.tolist()) & bad_ids, "trained on rows of a damaged shard"

    # the next pass reports, invalidates and re-scores exactly the damaged shards (v2)
    capsys.readouterr()
    again = score_pending(cfg, store, info)
    printed = capsys.readouterr().out
    assert sorted(again["damaged"]) == sorted(victims) and again["shards"] == len(victims)
    assert again["rows"] == sum(len(shard_rows[s]) for s in victims)
    for sid in victims:
        assert f"shard {sid} is damaged" in printed
    m = store.manifest()
    assert store.verify_all() == {}
    all_ids = []
    for sid in store.shard_ids():
        entry = m["shards"][sid]
        if sid in victims:
            assert entry["current"] == 2 and reasons[sid] in entry["versions"]["1"]["invalid"]
        else:
            assert entry["current"] == 1 and sorted(entry["versions"]) == ["1"]
        table = store.read_shard(sid)
        assert np.array_equal(table["seq_id"].to_numpy(), shard_rows[sid])
        all_ids.append(table["seq_id"].to_numpy())
    all_ids = np.concatenate(all_ids)
    assert len(all_ids) == inputs["train_rows"] == len(np.unique(all_ids))
    tg.decode(store.read_shard(victims[0]), "sampled")        # the re-issued shard decodes
    assert score_pending(cfg, store, info) is None              # and nothing is left to do
