"""Kill a committing process at each step of a commit; the store must stay readable and consistent.

The child runs a resumable pass for teacher revision "r2" over shards A (committed v1 by "r1") and B
(never scored): it writes and commits each pending shard in turn. RAYDISTILL_FAULT makes it die
(exit 86, no cleanup) at the first time it reaches the named point, i.e. during shard A.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow as pa
import pytest

from raydistill.store import SoftTargetStore, target_params

TOK = {"name": "tiny", "vocab_size": 512, "hash": "h1"}
TARGETS = {"format": "topk", "k": 4, "capture_temperature": 1.0}


def table(n, seed):
    rng = np.random.default_rng(seed)
    return pa.table({
        "seq_id": pa.array(np.arange(n, dtype=np.int64)),
        "input_ids": pa.array([rng.integers(0, 512, 16).astype(np.uint16) for _ in range(n)],
                              type=pa.list_(pa.uint16())),
        "topk_logprobs": pa.array([(-rng.random(60)).astype(np.float16) for _ in range(n)],
                                  type=pa.list_(pa.float16())),
    })


def commit(store, sid, t, rev, step):
    version = store.next_version(sid)
    w = store.write_shard(sid, version, t)
    fmt, params = target_params(TARGETS)
    store.commit(sid, version, {**w, "teacher_rev": rev, "format": fmt, "params": params,
                                "produced_at_step": step, "policy_version": -1})


# The child: the same code a teacher pass runs, with the tables rebuilt from seeds.
CHILD = textwrap.dedent("""
    import sys
    sys.path.insert(0, {here!r})
    from test_commit_crash import TOK, TARGETS, table, commit
    from raydistill.store import SoftTargetStore
    store = SoftTargetStore.open({uri!r}, tokenizer=TOK, targets=TARGETS, create=False)
    rows = {{"A": 30, "B": 20}}
    for sid in store.pending("r2", TARGETS):
        commit(store, sid, table(rows[sid], seed=2), rev="r2", step=100)
""")


def run_child(uri, fault):
    env = {k: v for k, v in os.environ.items() if k != "RAYDISTILL_FAULT"}
    if fault:
        env["RAYDISTILL_FAULT"] = fault
    code = CHILD.format(here=os.path.dirname(__file__), uri=uri)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=60)


def assert_intact(store, sid, version, rows):
    rec = store.current(sid)
    assert rec is not None and rec["version"] == version and rec["rows"] == rows
    data = open(store.full_path(rec["path"]), "rb").read()
    assert "sha256:" + hashlib.sha256(data).hexdigest() == rec["checksum"]
    assert store.read_shard(sid).num_rows == rows and store.verify(sid) is None


def tmp_files(root):
    return [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f.startswith(".tmp-")]


@pytest.mark.parametrize("fault", ["after_temp_write", "after_rename", "after_manifest_temp",
                                   "after_manifest"])
def test_crash_during_commit(tmp_path, fault):
    uri = str(tmp_path / "targets")
    store = SoftTargetStore.open(uri, tokenizer=TOK, targets=TARGETS)
    inputs = {sid: store.write_file(f"inputs/train/{sid}.parquet", table(n, seed=0))
              for sid, n in (("A", 30), ("B", 20))}
    store.record_inputs({sid: {"input": w["path"], "rows": w["rows"]} for sid, w in inputs.items()},
                        None, {"seq_len": 16})
    commit(store, "A", table(10, seed=1), rev="r1", step=-1)
    before = store.manifest()

    child = run_child(uri, fault)
    assert child.returncode == 86, child.stderr

    store = SoftTargetStore.open(uri, tokenizer=TOK, targets=TARGETS, create=False)
    if fault == "after_manifest":
        # A's commit landed; the child died before reaching B.
        assert_intact(store, "A", 2, 30)
        assert store.current("B") is None
        assert store.pending("r2", TARGETS) == ["B"]
    else:
        # Nothing visible changed: the manifest is the one written before the crash.
        m = store.manifest()
        assert m["shards"] == before["shards"] and m["updated"] == before["updated"]
        assert_intact(store, "A", 1, 10)
        assert store.read_shard("A").equals(table(10, seed=1))
        assert store.current("B") is None
        assert store.pending("r2", TARGETS) == ["A", "B"]
        assert store.verify_all() == {}
    if fault in ("after_temp_write", "after_manifest_temp"):
        assert len(tmp_files(uri)) == 1           # the debris the crash left behind

    # The same pass again, no fault: it finishes what is pending and nothing else.
    child = run_child(uri, None)
    assert child.returncode == 0, child.stderr
    assert_intact(store, "A", 2, 30)
    assert_intact(store, "B", 1, 20)
    assert store.read_shard("A").equals(table(30, seed=2))
    assert store.read_shard("B").equals(table(20, seed=2))
    assert store.pending("r2", TARGETS) == [] and store.verify_all() == {}
    assert store.current("A")["teacher_rev"] == "r2" and store.ages(100) == {"A": 0, "B": 0}
    assert sorted(store.manifest()["shards"]["A"]["versions"]) == ["1", "2"]

    store.gc(keep=2, tmp_grace_s=0)
    assert tmp_files(uri) == []
    assert sorted(os.listdir(os.path.join(uri, "shards", "A"))) == ["v1.parquet", "v2.parquet"]
    assert sorted(os.listdir(os.path.join(uri, "shards", "B"))) == ["v1.parquet"]
    assert_intact(store, "A", 2, 30)
