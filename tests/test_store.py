"""SoftTargetStore: open/refuse, atomic versions, checksums, pending/ages, GC, remote filesystems."""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import threading
import uuid

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings, strategies as st

from raydistill.errors import CorruptShardError, StoreError
from raydistill.store import SoftTargetStore, target_params

TOK = {"name": "tiny-bpe", "vocab_size": 512, "hash": "abc123"}
TOPK = {"format": "topk", "k": 4, "capture_temperature": 1.0}
SAMPLED = {"format": "sampled", "samples": 50, "capture_temperature": 1.0}


def make_table(n=5, seq_len=8, seed=0):
    rng = np.random.default_rng(seed)
    return pa.table({
        "seq_id": pa.array(np.arange(n, dtype=np.int64) + 100 * seed),
        "input_ids": pa.array([rng.integers(0, 512, seq_len).astype(np.uint16) for _ in range(n)],
                              type=pa.list_(pa.uint16())),
        "label_logprob": pa.array([(-rng.random(seq_len - 1)).astype(np.float16) for _ in range(n)],
                                  type=pa.list_(pa.float16())),
    })


def put(store, sid, table, *, rev="rA", targets=TOPK, step=-1, version=None):
    """Write + commit one version the way a teacher pass does; returns the version."""
    version = store.next_version(sid) if version is None else version
    written = store.write_shard(sid, version, table)
    fmt, params = target_params(targets)
    store.commit(sid, version, {**written, "teacher_rev": rev, "format": fmt, "params": params,
                                "produced_at_step": step, "policy_version": -1})
    return version


def version_files(root, sid):
    d = os.path.join(root, "shards", sid)
    return sorted(f for f in os.listdir(d) if not f.startswith(".tmp-"))


@pytest.fixture
def store(tmp_path):
    return SoftTargetStore.open(str(tmp_path / "targets"), tokenizer=TOK, targets=TOPK)


# ---------------------------------------------------------------- open / refuse
def test_open_creates_manifest_and_reopens(tmp_path):
    uri = str(tmp_path / "t")
    s = SoftTargetStore.open(uri, tokenizer=TOK, targets=TOPK)
    m = json.loads((tmp_path / "t" / "manifest.json").read_text())
    assert m["format_version"] == 1
    assert m["tokenizer"] == TOK and m["targets"] == TOPK
    assert m["shards"] == {} and m["state"] == {}
    assert m["inputs"] == {"shards": {}, "eval": None, "info": {}}
    # Name is informative only: same vocab and hash reopen fine.
    s2 = SoftTargetStore.open(uri, tokenizer={**TOK, "name": "renamed"}, targets=TOPK, create=False)
    assert s2.manifest()["tokenizer"] == TOK
    assert s.uri == s2.uri == uri


def test_open_missing_without_create(tmp_path):
    with pytest.raises(StoreError, match="no soft-target store"):
        SoftTargetStore.open(str(tmp_path / "nope"), tokenizer=TOK, targets=TOPK, create=False)


@pytest.mark.parametrize("change", [{"hash": "zzz999"}, {"vocab_size": 1024}])
def test_open_refuses_other_tokenizer(tmp_path, change):
    uri = str(tmp_path / "t")
    SoftTargetStore.open(uri, tokenizer=TOK, targets=TOPK)
    other = {**TOK, **change}
    with pytest.raises(StoreError) as ei:
        SoftTargetStore.open(uri, tokenizer=other, targets=TOPK)
    msg = str(ei.value)
    (key, val), = change.items()
    assert uri in msg
    assert str(TOK[key]) in msg and str(val) in msg        # both sides named
    assert "use another targets.store" in msg and f"delete {uri}" in msg


@pytest.mark.parametrize("old,new", [(576, 512), (512, 576)])
def test_open_refuses_other_width(tmp_path, old, new):
    """A store scored at width W (the models' narrowest head, tokenizer["width"]) is refused by a run
    whose models share another W, either way; the same W reopens, and so does a store written before
    "width" was recorded (and a caller that gives none)."""
    uri = str(tmp_path / "t")
    SoftTargetStore.open(uri, tokenizer={**TOK, "width": old}, targets=TOPK)
    with pytest.raises(StoreError) as ei:
        SoftTargetStore.open(uri, tokenizer={**TOK, "width": new}, targets=TOPK)
    msg = str(ei.value)
    assert uri in msg and f"scored at width {old}" in msg and f"share width {new}" in msg
    assert "use a new targets.store" in msg and f"models this store was built with (width {old})" in msg
    assert ("index past" in msg) == (old > new)
    same = SoftTargetStore.open(uri, tokenizer={**TOK, "width": old}, targets=TOPK)
    assert same.manifest()["tokenizer"]["width"] == old
    SoftTargetStore.open(uri, tokenizer=TOK, targets=TOPK)
    older = str(tmp_path / "older")
    SoftTargetStore.open(older, tokenizer=TOK, targets=TOPK)  # its manifest has no "width"
    assert "width" not in SoftTargetStore.open(older, tokenizer={**TOK, "width": new}, targets=TOPK,
                                               create=False).manifest()["tokenizer"]


@pytest.mark.parametrize("other", [SAMPLED, {**TOPK, "k": 8}])
def test_open_refuses_other_format(tmp_path, other):
    uri = str(tmp_path / "t")
    SoftTargetStore.open(uri, tokenizer=TOK, targets=TOPK)
    with pytest.raises(StoreError) as ei:
        SoftTargetStore.open(uri, tokenizer=TOK, targets=other)
    msg = str(ei.value)
    assert '"format": "topk"' in msg and json.dumps(other, sort_keys=True) in msg
    assert "use another targets.store" in msg


def test_relative_path_becomes_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = SoftTargetStore.open("rel_store", tokenizer=TOK, targets=TOPK)
    assert s.uri == str(tmp_path / "rel_store")
    assert pickle.loads(pickle.dumps(s)).uri == s.uri


# ---------------------------------------------------------------- versions
def test_commit_read_roundtrip(store):
    t = make_table(6)
    assert store.current("s0") is None and store.next_version("s0") == 1
    v = put(store, "s0", t)
    assert v == 1
    rec = store.current("s0")
    assert rec["version"] == 1 and rec["path"] == "shards/s0/v1.parquet"
    assert rec["rows"] == 6 and rec["teacher_rev"] == "rA" and rec["format"] == "topk"
    assert rec["params"] == {"k": 4, "capture_temperature": 1.0}
    assert rec["produced_at_step"] == -1 and rec["policy_version"] == -1 and "created" in rec
    data = open(store.full_path(rec["path"]), "rb").read()
    assert rec["checksum"] == "sha256:" + hashlib.sha256(data).hexdigest()
    assert rec["bytes"] == len(data)
    got = store.read_shard("s0")
    assert got.equals(t)
    assert got.schema.field("input_ids").type == pa.list_(pa.uint16())
    meta = pq.ParquetFile(store.full_path(rec["path"])).metadata
    col = meta.row_group(0).column(1)
    assert col.compression == "ZSTD" and col.statistics is not None
    assert not any("DICTIONARY" in e for e in col.encodings)


def test_versions_increment_and_gc(store):
    tables = [make_table(4, seed=i) for i in range(4)]
    for i, t in enumerate(tables):
        assert put(store, "s0", t) == i + 1
        assert store.next_version("s0") == i + 2
    put(store, "s1", make_table(3, seed=9))
    assert store.current("s0")["version"] == 4 and store.read_shard("s0").equals(tables[3])
    # A superseded version stays readable (an epoch in flight may hold it) until gc.
    old = store.manifest()["shards"]["s0"]["versions"]["1"]
    assert pq.read_table(store.full_path(old["path"])).equals(tables[0])
    root = store.full_path("")[:-1]
    assert version_files(root, "s0") == ["v1.parquet", "v2.parquet", "v3.parquet", "v4.parquet"]

    assert store.gc(keep=2) == 2
    assert version_files(root, "s0") == ["v3.parquet", "v4.parquet"]
    assert version_files(root, "s1") == ["v1.parquet"]
    m = store.manifest()
    assert sorted(m["shards"]["s0"]["versions"]) == ["3", "4"] and m["shards"]["s0"]["current"] == 4
    assert store.next_version("s0") == 5
    assert store.read_shard("s0").equals(tables[3]) and store.verify_all() == {}
    assert store.gc(keep=2) == 0


def test_commit_refuses_missing_file_and_going_back(store):
    with pytest.raises(StoreError, match="shared storage"):
        store.commit("s0", 1, {"rows": 1, "checksum": "sha256:x", "bytes": 10, "teacher_rev": "r",
                               "format": "topk", "params": {}, "produced_at_step": 0,
                               "policy_version": -1})
    with pytest.raises(StoreError, match="lacks"):
        store.commit("s0", 1, {"rows": 1})
    put(store, "s0", make_table(), version=2)
    w = store.write_shard("s0", 1, make_table())
    with pytest.raises(StoreError, match="go back"):
        store.commit("s0", 1, {**w, "teacher_rev": "r", "format": "topk", "params": {},
                               "produced_at_step": 0, "policy_version": -1})
    assert store.current("s0")["version"] == 2


def test_pending_ages_invalidate(store):
    store.record_inputs({f"s{i}": {"input": f"inputs/train/s{i}.parquet", "rows": 5} for i in range(3)},
                        "inputs/eval.parquet", {"seq_len": 8})
    assert store.pending("rA", TOPK) == ["s0", "s1", "s2"]
    put(store, "s0", make_table(5), step=-1)
    put(store, "s1", make_table(5), step=10)
    assert store.pending("rA", TOPK) == ["s2"]
    put(store, "s2", make_table(5), step=20)
    assert store.pending("rA", TOPK) == []
    assert store.pending("rB", TOPK) == ["s0", "s1", "s2"]
    assert store.pending("rA", {**TOPK, "k": 8}) == ["s0", "s1", "s2"]
    assert store.ages(30) == {"s0": 31, "s1": 20, "s2": 10}

    store.invalidate("s1", "checksum mismatch")
    assert store.current("s1") is None
    assert store.pending("rA", TOPK) == ["s1"]
    assert store.ages(30) == {"s0": 31, "s2": 10}
    assert store.manifest()["shards"]["s1"]["versions"]["1"]["invalid"] == "checksum mismatch"
    with pytest.raises(StoreError, match="no current version"):
        store.read_shard("s1")
    assert store.next_version("s1") == 2          # the bad version's number is not reused
    put(store, "s1", make_table(5), step=30)
    assert store.pending("rA", TOPK) == [] and "invalid" not in store.current("s1")

    s = store.summary()
    assert s["shards"] == 3 and s["rows"] == 15 and s["tokens"] == 120
    assert s["current"] == {"s0": 1, "s1": 2, "s2": 1}
    assert s["bytes"] == sum(store.current(f"s{i}")["bytes"] for i in range(3))


def test_inputs_and_state(store):
    assert not store.has_inputs()
    w = store.write_file("inputs/train/b.parquet", make_table(3))
    e = store.write_file("inputs/eval.parquet", make_table(2, seed=5))
    store.write_file("inputs/train/a.parquet", make_table(4, seed=1))
    store.record_inputs({"b": {"input": w["path"], "rows": 3},
                         "a": {"input": "inputs/train/a.parquet", "rows": 4}},
                        e["path"], {"seq_len": 8, "corpus": "sha256:xyz"})
    assert store.has_inputs() and store.shard_ids() == ["a", "b"]
    assert store.input_path("b") == store.full_path("inputs/train/b.parquet")
    assert store.read_input("b").equals(make_table(3))
    assert pq.read_table(store.eval_path(), filesystem=store.filesystem).equals(make_table(2, seed=5))
    with pytest.raises(StoreError, match="no inputs for shard"):
        store.input_path("zz")
    assert store.state("sched") is None and store.state("sched", 7) == 7
    store.update_state("sched", {"next": 3, "passes": [1, 2]})
    assert store.state("sched") == {"next": 3, "passes": [1, 2]}


def test_manifest_survives_new_object(store):
    put(store, "s0", make_table(5))
    store.update_state("k", 1)
    fresh = SoftTargetStore(store.uri)
    assert fresh.manifest()["shards"] == store.manifest()["shards"]
    assert fresh.read_shard("s0").equals(make_table(5)) and fresh.state("k") == 1
    # A reader in another object sees a commit made afterwards (no caching).
    put(store, "s0", make_table(7, seed=3))
    assert fresh.current("s0")["version"] == 2 and fresh.read_shard("s0").num_rows == 7


# ---------------------------------------------------------------- corruption
def _flip(path):
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(path, "wb").write(bytes(data))


def _truncate(path):
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])


@pytest.mark.parametrize("damage,what", [(_flip, "checksum mismatch"), (_truncate, "checksum mismatch"),
                                         (os.remove, "file missing")])
def test_corruption_detected(store, damage, what):
    put(store, "good", make_table(4))
    put(store, "bad7", make_table(4, seed=2))
    path = store.full_path(store.current("bad7")["path"])
    damage(path)
    with pytest.raises(CorruptShardError) as ei:
        store.read_shard("bad7")
    msg = str(ei.value)
    assert "bad7" in msg and "v1" in msg and path in msg and what in msg and "expected" in msg
    assert ei.value.shard_id == "bad7" and ei.value.version == 1
    again = pickle.loads(pickle.dumps(ei.value))        # crosses Ray processes
    assert str(again) == msg and again.shard_id == "bad7"
    assert store.verify("good") is None and what in store.verify("bad7")
    assert list(store.verify_all()) == ["bad7"]
    store.read_shard("good")


def test_row_mismatch_and_unparsable(store):
    put(store, "s0", make_table(4))
    m = store.manifest()
    m["shards"]["s0"]["versions"]["1"]["rows"] = 5
    store._write_manifest(m)
    with pytest.raises(CorruptShardError, match="row count mismatch.*expected 5 rows, found 4 rows"):
        store.read_shard("s0")
    # Garbage whose checksum is recorded: the checksum passes, the parse fails.
    path = store.full_path("shards/s1/v1.parquet")
    os.makedirs(os.path.dirname(path))
    open(path, "wb").write(b"not parquet at all")
    store.commit("s1", 1, {"rows": 1, "bytes": 18, "teacher_rev": "r", "format": "topk", "params": {},
                           "checksum": "sha256:" + hashlib.sha256(b"not parquet at all").hexdigest(),
                           "produced_at_step": 0, "policy_version": -1})
    with pytest.raises(CorruptShardError, match="unparsable Parquet"):
        store.read_shard("s1")
    assert sorted(store.verify_all()) == ["s0", "s1"]


# ---------------------------------------------------------------- remote filesystem (fsspec memory)
def test_fsspec_memory_filesystem_roundtrip():
    fs = pafs.PyFileSystem(pafs.FSSpecHandler(fsspec.filesystem("memory")))
    root = f"/rd-{uuid.uuid4().hex}/targets"
    s = SoftTargetStore.open(root, tokenizer=TOK, targets=TOPK, filesystem=fs)
    assert s.filesystem is fs
    w = s.write_file("inputs/train/s0.parquet", make_table(3))
    s.record_inputs({"s0": {"input": w["path"], "rows": 3}}, None, {"seq_len": 8})
    assert s.read_input("s0").equals(make_table(3))
    tables = [make_table(5, seed=i) for i in range(3)]
    for t in tables:
        put(s, "s0", t)
    assert s.read_shard("s0").equals(tables[-1]) and s.verify_all() == {}
    # The same filesystem, a new handle: state comes from storage.
    s2 = SoftTargetStore.open(root, tokenizer=TOK, targets=TOPK, filesystem=fs, create=False)
    assert s2.current("s0")["version"] == 3 and s2.pending("rA", TOPK) == []
    assert s2.gc(keep=2) == 1
    files = sorted(i.path.rsplit("/", 1)[1] for i in fs.get_file_info(
        pafs.FileSelector(s.full_path("shards/s0"))))
    assert files == ["v2.parquet", "v3.parquet"]
    assert sorted(s2.manifest()["shards"]["s0"]["versions"]) == ["2", "3"]
    assert s2.read_shard("s0").equals(tables[-1])
    with pytest.raises(StoreError, match="tokenizer"):
        SoftTargetStore.open(root, tokenizer={**TOK, "hash": "other"}, targets=TOPK, filesystem=fs)


# ---------------------------------------------------------------- gc debris
def test_gc_removes_debris_but_not_young_temps(store):
    put(store, "s0", make_table(3))
    put(store, "s0", make_table(3, seed=1))
    root = store.full_path("")[:-1]
    d = os.path.join(root, "shards", "s0")
    tmp = os.path.join(d, ".tmp-deadbeef-v3.parquet")
    open(tmp, "wb").write(b"partial")
    open(os.path.join(root, ".tmp-cafe-manifest.json"), "wb").write(b"{")
    open(os.path.join(d, "v9.parquet"), "wb").write(b"in flight")      # above every recorded version
    assert store.gc(keep=2) == 0                                         # young temps may be in flight
    assert os.path.exists(tmp)
    assert store.gc(keep=2, tmp_grace_s=0) == 2
    assert sorted(os.listdir(d)) == ["v1.parquet", "v2.parquet", "v9.parquet"]
    assert sorted(os.listdir(root)) == ["manifest.json", "shards"]
    # An uncommitted version below the newest recorded one is crash debris.
    put(store, "s0", make_table(3, seed=2), version=10)
    assert store.gc(keep=2) == 2                                         # v1 (beyond keep) and v9
    assert sorted(os.listdir(d)) == ["v10.parquet", "v2.parquet"]


@settings(max_examples=15, deadline=None)
@given(counts=st.lists(st.integers(1, 5), min_size=1, max_size=3), keep=st.integers(1, 3))
def test_gc_property(counts, keep):
    fs = pafs.PyFileSystem(pafs.FSSpecHandler(fsspec.filesystem("memory")))
    s = SoftTargetStore.open(f"/rd-{uuid.uuid4().hex}", tokenizer=TOK, targets=TOPK, filesystem=fs)
    t = make_table(2)
    for i, n in enumerate(counts):
        for _ in range(n):
            put(s, f"s{i}", t)
    s.gc(keep=keep)
    m = s.manifest()
    for i, n in enumerate(counts):
        files = {f.path.rsplit("/", 1)[1] for f in fs.get_file_info(
            pafs.FileSelector(s.full_path(f"shards/s{i}")))}
        kept = list(range(n, max(0, n - keep), -1))
        assert files == {f"v{v}.parquet" for v in kept}
        assert sorted(map(int, m["shards"][f"s{i}"]["versions"])) == sorted(kept)
        assert s.current(f"s{i}")["version"] == n and s.next_version(f"s{i}") == n + 1


# ---------------------------------------------------------------- concurrent readers
def test_concurrent_reader_never_sees_partial(store):
    big = [make_table(400, seq_len=64, seed=i) for i in range(4)]
    put(store, "s0", big[0])
    stop = threading.Event()
    seen, errors = [], []

    def reader():
        r = SoftTargetStore(store.uri)
        while not stop.is_set():
            try:
                rec = r.current("s0")
                data = open(r.full_path(rec["path"]), "rb").read()
                assert rec["checksum"] == "sha256:" + hashlib.sha256(data).hexdigest()
                t = r.read_shard("s0")
                seen.append(t.num_rows)
            except Exception as e:  # noqa: BLE001 -- reported below
                errors.append(repr(e))

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for th in threads:
        th.start()
    for i in range(1, 12):
        put(store, "s0", big[i % 4])
    stop.set()
    for th in threads:
        th.join()
    assert errors == [] and seen and set(seen) == {400}
    assert store.read_shard("s0").equals(big[11 % 4])
