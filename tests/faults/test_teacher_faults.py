"""A teacher replica (Ray Data actor) dies in the middle of a pass: the pass still completes, and the
store holds exactly the expected rows — every seq_id once, none lost, none duplicated — with one
committed version per shard; a second pass scores nothing.

Two ways to die, both real process deaths inside a running pass:
  * the test hook in TeacherReplica.score_shard (RAYDISTILL_TEACHER_KILL_* on the driver, passed to
    the replicas by run_teacher_pass): `os._exit(1)` at the replica's N-th shard, before or after
    it wrote that shard's version file (after: an uncommitted file the retry must replace);
  * `ray.kill` of a live replica actor, found through the state API, from outside.
"""
from __future__ import annotations

import os
import shutil
import signal
import threading
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from raydistill.data import build_inputs
from raydistill.models import preflight
from raydistill.pipeline import open_store, score_pending
from raydistill.teacher import target_params

from test_teacher_pass import make_cfg

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def base_store(ray_session, tmp_path_factory, tiny_dir, tiny_corpus):
    """Inputs built once (Ray Data tokenize + pack); each test scores a copy of this store."""
    root = tmp_path_factory.mktemp("teacher-faults")
    cfg = make_cfg(root, tiny_dir, tiny_corpus, fmt="sampled", targets__shard_rows=24, teacher__replicas=2)
    info = preflight(cfg)
    store = open_store(cfg, info)
    inputs = build_inputs(cfg, store, info)
    assert inputs["shards"] >= 6, inputs
    expected = np.concatenate([pq.read_table(store.input_path(s))["seq_id"].to_numpy()
                               for s in store.shard_ids()])
    assert len(expected) == inputs["train_rows"] == len(np.unique(expected))
    return store.uri, inputs, np.sort(expected)


def prepared(tmp_path, tiny_dir, corpus, base):
    uri, inputs, expected = base
    shutil.copytree(uri, tmp_path / "targets")          # paths in the manifest are relative
    cfg = make_cfg(tmp_path, tiny_dir, corpus, fmt="sampled", targets__shard_rows=24, teacher__replicas=2,
                   targets__store=tmp_path / "targets")
    info = preflight(cfg)
    store = open_store(cfg, info)
    assert store.has_inputs() and not store.manifest()["shards"]
    return cfg, info, store, inputs, expected


def assert_exact(store, info, cfg, inputs, expected):
    """Every shard: one committed version (v1), intact, its input rows once; nothing pending."""
    m = store.manifest()
    assert sorted(m["shards"]) == store.shard_ids() and len(m["shards"]) == inputs["shards"]
    assert store.verify_all() == {}
    seq_ids = []
    for sid in store.shard_ids():
        entry = m["shards"][sid]
        assert entry["current"] == 1 and list(entry["versions"]) == ["1"], (sid, entry)
        table = store.read_shard(sid)
        want = pq.read_table(store.input_path(sid))
        assert table["seq_id"].equals(want["seq_id"]) and table["input_ids"].equals(want["input_ids"])
        assert entry["versions"]["1"]["rows"] == want.num_rows
        seq_ids.append(table["seq_id"].to_numpy())
    got = np.concatenate(seq_ids)
    assert len(got) == inputs["train_rows"] and len(np.unique(got)) == len(got)
    assert np.array_equal(np.sort(got), expected)
    # only committed version files on disk (a retry rewrote the same version name, no stray copy)
    for sid in store.shard_ids():
        names = [n for n in os.listdir(os.path.join(store.uri, "shards", sid)) if not n.startswith(".tmp-")]
        assert names == ["v1.parquet"], (sid, names)
    # resumable: nothing left to score
    assert store.pending(info.teacher_rev, target_params(cfg.targets)) == []
    assert score_pending(cfg, store, info) is None


@pytest.mark.parametrize("when", ["before_write", "after_write"])
def test_replica_dies_mid_pass(base_store, tmp_path, tiny_dir, tiny_corpus, monkeypatch, when):
    cfg, info, store, inputs, expected = prepared(tmp_path, tiny_dir, tiny_corpus, base_store)
    marker = tmp_path / "teacher-killed"
    monkeypatch.setenv("RAYDISTILL_TEACHER_KILL_AT_SHARD", "2")
    monkeypatch.setenv("RAYDISTILL_TEACHER_KILL_MARKER", str(marker))
    monkeypatch.setenv("RAYDISTILL_TEACHER_KILL_WHEN", when)

    stats = score_pending(cfg, store, info)

    assert marker.exists(), "the replica was not killed"
    pid = int(marker.read_text())
    with pytest.raises(ProcessLookupError):           # that replica's process is really gone
        os.kill(pid, 0)
    assert stats["complete"] and stats["shards"] == inputs["shards"] == stats["expected_shards"]
    assert stats["rows"] == inputs["train_rows"]       # each shard committed once, none twice
    monkeypatch.delenv("RAYDISTILL_TEACHER_KILL_AT_SHARD")
    assert_exact(store, info, cfg, inputs, expected)


def test_replica_process_killed_from_outside(base_store, tmp_path, tiny_dir, tiny_corpus, monkeypatch):
    """SIGKILL of a replica actor's process while the pass runs (what an OOM kill looks like)."""
    import ray
    from ray._private.state import actors   # the GCS actor table (the session runs no dashboard)

    from raydistill.teacher import run_teacher_pass

    cfg, info, store, inputs, expected = prepared(tmp_path, tiny_dir, tiny_corpus, base_store)
    monkeypatch.setenv("RAYDISTILL_TEACHER_DELAY_S", "1.0")   # every shard takes >= 1 s
    job = ray.get_runtime_context().get_job_id()
    killed: list[dict] = []
    committed: list[str] = []
    errors: list[BaseException] = []

    def replicas():
        return [a for a in actors().values() if a["JobID"] == job and "MapWorker" in a["ActorClassName"]]

    def killer():
        try:
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline and not killed:
                if committed:   # the pass is running and has landed a shard
                    alive = [a for a in replicas() if a["State"] == "ALIVE" and a["Pid"]]
                    if alive:
                        os.kill(alive[0]["Pid"], signal.SIGKILL)
                        killed.append(alive[0])
                time.sleep(0.2)
        except BaseException as e:  # surfaced by the test, not lost in the thread
            errors.append(e)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    stats = run_teacher_pass(cfg, store, store.shard_ids(), vocab_size=info.vocab_size,
                             teacher_rev=info.teacher_rev, on_commit=lambda sid, rec: committed.append(sid))
    t.join(timeout=10)
    assert not errors, errors
    assert killed, "no replica actor was found to kill"
    with pytest.raises(ProcessLookupError):
        os.kill(killed[0]["Pid"], 0)
    after = actors().get(killed[0]["ActorID"])
    assert after is not None and after["NumRestarts"] >= 1      # Ray Data restarted it
    assert len(committed) == len(set(committed)) == inputs["shards"]
    assert stats["complete"] and stats["rows"] == inputs["train_rows"]
    monkeypatch.delenv("RAYDISTILL_TEACHER_DELAY_S")
    assert_exact(store, info, cfg, inputs, expected)


def test_refresh_pool_replica_dies_and_the_pool_stays_loaded(base_store, tmp_path, tiny_dir, tiny_corpus,
                                                             monkeypatch):
    """The refresh scheduler's long-lived TeacherPool: a replica dies after writing its 2nd shard;
    Ray restarts it and retries that shard; the pass is exact. A second pass reuses the same live
    replica processes (the teacher is not reloaded per pass)."""
    from ray._private.state import actors

    from raydistill.refresh.pool import TeacherPool
    from raydistill.teacher import run_teacher_pass

    cfg, info, store, inputs, expected = prepared(tmp_path, tiny_dir, tiny_corpus, base_store)
    marker = tmp_path / "pool-replica-killed"
    monkeypatch.setenv("RAYDISTILL_TEACHER_KILL_AT_SHARD", "2")
    monkeypatch.setenv("RAYDISTILL_TEACHER_KILL_MARKER", str(marker))
    pool = TeacherPool(cfg, store, vocab_size=info.vocab_size, size=2, teacher_rev=info.teacher_rev)
    try:
        stats = run_teacher_pass(cfg, store, store.shard_ids(), vocab_size=info.vocab_size,
                                 teacher_rev=info.teacher_rev, pool=pool)
        assert marker.exists(), "the replica was not killed"
        with pytest.raises(ProcessLookupError):
            os.kill(int(marker.read_text()), 0)
        assert stats["complete"] and stats["replicas"] == 2
        assert stats["shards"] == inputs["shards"] and stats["rows"] == inputs["train_rows"]
        monkeypatch.delenv("RAYDISTILL_TEACHER_KILL_AT_SHARD")
        assert_exact(store, info, cfg, inputs, expected)

        ids = [r._actor_id.hex() for r in pool.actors]
        before = {i: actors()[i] for i in ids}
        assert sum(a["NumRestarts"] for a in before.values()) == 1 and all(a["State"] == "ALIVE"
                                                                          for a in before.values())
        again = store.shard_ids()[:3]
        stats2 = run_teacher_pass(cfg, store, again, vocab_size=info.vocab_size, teacher_rev=info.teacher_rev,
                                  step=7, source="teacher", pool=pool)
        assert stats2["shards"] == 3 and stats2["complete"]
        after = {i: actors()[i] for i in ids}
        assert {i: (a["Pid"], a["NumRestarts"]) for i, a in after.items()} == \
               {i: (a["Pid"], a["NumRestarts"]) for i, a in before.items()}   # same processes, no reload
        m = store.manifest()
        for sid in store.shard_ids():
            current = m["shards"][sid]["current"]
            assert current == (2 if sid in again else 1)
            assert m["shards"][sid]["versions"][str(current)]["produced_at_step"] == (7 if sid in again else -1)
        assert store.verify_all() == {}
    finally:
        pool.close()
