"""Refresh scheduler: policy logic and the state machine stepped with no cluster (fake passes)."""
from __future__ import annotations

import math
import threading
import time

import pyarrow as pa
import pytest

from raydistill.config import Config, RefreshConfig, RunConfig
from raydistill.refresh.policy import RefreshDecision, Random, RoundRobin, bound_steps, shards_per_decision
from raydistill.refresh.scheduler import RefreshScheduler
from raydistill.store import SoftTargetStore

# ------------------------------------------------------------------ no cluster: a store and fake passes


def make_cfg(policy="round_robin", fraction=0.25, every=4, seed=0, name="sched-unit"):
    cfg = Config()
    cfg.run = RunConfig(name=name)
    cfg.refresh = RefreshConfig(policy=policy, fraction=fraction, every_steps=every, seed=seed)
    return cfg


def make_store(path, n_shards=8) -> SoftTargetStore:
    """A store with n shards whose first version comes from the initial pass (produced_at_step -1)."""
    store = SoftTargetStore.open(str(path), tokenizer={"name": "t", "vocab_size": 10, "hash": "h"},
                                 targets={"format": "sampled", "samples": 4, "capture_temperature": 1.0})
    ids = [f"{i:05d}" for i in range(n_shards)]
    store.record_inputs({sid: {"input": f"inputs/train/{sid}.parquet", "rows": 10} for sid in ids}, None, {})
    for sid in ids:
        fake_commit(store, sid, -1)
    return store


def fake_commit(store, sid, step):
    version = store.next_version(sid)
    w = store.write_shard(sid, version, pa.table({"seq_id": pa.array([int(sid)], pa.int64())}))
    store.commit(sid, version, {"rows": 10, "checksum": w["checksum"], "bytes": w["bytes"], "teacher_rev": "r",
                                "format": "sampled", "params": {}, "produced_at_step": step,
                                "policy_version": -1})


def instant_pass(store=None, log=None):
    """A pass that lands at once (in memory, or committed to `store` for restart tests)."""
    def run(decision: RefreshDecision, on_commit):
        if log is not None:
            log.append(decision)
        for sid in decision.shard_ids:
            if store is not None:
                fake_commit(store, sid, decision.step)
            on_commit(sid, {"produced_at_step": decision.step})
        return {"rows": 10 * len(decision.shard_ids), "tokens": 160 * len(decision.shard_ids), "complete": True}
    return run


class MemoryStore(SoftTargetStore):
    """The store's manifest logic without disk (long simulations persist state at every decision)."""

    def __init__(self, n_shards):
        super().__init__("/nonexistent/memory-store")
        rec = {"rows": 10, "produced_at_step": -1, "version": 1, "path": "x"}
        self._m = {"format_version": 1, "inputs": {"shards": {}}, "state": {},
                   "shards": {f"{i:05d}": {"current": 1, "versions": {"1": dict(rec)}} for i in range(n_shards)}}

    def _read_manifest(self, missing_ok=False):
        return self._m      # shared, not copied: nothing here mutates it outside _update

    def _write_manifest(self, m):
        self._m = m


def simulate(tmp_path, *, policy="round_robin", fraction=0.25, every=4, n_shards=8, steps=200, seed=0):
    store = MemoryStore(n_shards)
    log = []
    sched = RefreshScheduler(make_cfg(policy, fraction, every, seed), store, run_pass=instant_pass(log=log),
                             background=False, persist_every_s=1e9)
    for step in range(1, steps + 1):
        sched.on_step(step)
    return sched, log


def test_round_robin_picks_the_oldest_ceil_fraction_shards():
    ages = {"a": 5, "b": 9, "c": 9, "d": None, "e": 1, "f": 7, "g": 0, "h": 3, "i": 2, "j": 8}
    k = shards_per_decision(0.25, len(ages))
    assert k == 3                                           # ceil(0.25 * 10)
    assert RoundRobin().select(ages, k, step=12) == ["d", "b", "c"]   # no version first, ties by id
    assert RoundRobin().select(ages, 5, step=12) == ["d", "b", "c", "j", "f"]
    assert shards_per_decision(0.3, 7) == 3 and shards_per_decision(0.01, 7) == 1
    assert bound_steps(0.25, 5) == 20 and bound_steps(0.3, 4) == 16 and bound_steps(0.1, 3) == 30
    chosen = Random(3).select(ages, k, step=12)
    assert len(set(chosen)) == 3 and chosen == Random(3).select(ages, k, step=12)  # seeded by (seed, step)


@pytest.mark.parametrize("n_shards,fraction,every", [(8, 0.25, 4), (10, 0.25, 3), (7, 0.3, 5), (9, 0.5, 2)])
def test_round_robin_bound_is_exact(tmp_path, n_shards, fraction, every):
    sched, log = simulate(tmp_path, fraction=fraction, every=every, n_shards=n_shards, steps=30 * every)
    st = sched.status()
    bound = math.ceil(round(1 / fraction, 9)) * every
    assert st["bound_steps"] == bound
    assert [d.step for d in log] == list(range(every, 30 * every + 1, every))       # every S steps
    assert all(len(d.shard_ids) == shards_per_decision(fraction, n_shards) for d in log)
    assert all(p is not None and p >= 0 for p in sched.produced.values())           # all refreshed
    ages = [a["max_age"] for a in st["ages"]]
    assert len(ages) == 30 * every and max(ages) <= bound
    if (1 / fraction).is_integer() and n_shards * fraction == int(n_shards * fraction):
        assert max(ages) == bound    # tight: the last initial shards wait ceil(1/f) decisions
    assert st["max_age_seen"] == max(ages) and st["passes"] == 30 and st["max_latency_steps"] == 0


def test_random_policy_has_a_longer_tail(tmp_path):
    steps, every = 800, 4
    rr, _ = simulate(tmp_path, policy="round_robin", every=every, steps=steps)
    rnd, log = simulate(tmp_path, policy="random", every=every, steps=steps, seed=0)
    bound = bound_steps(0.25, every)
    assert rr.status()["max_age_seen"] <= bound
    assert rnd.status()["max_age_seen"] > bound          # the age tail round robin removes
    assert rnd.status()["max_age_seen"] >= 2 * bound     # and not by a hair (seed 0: far above)
    # same mean refresh rate: 2 of 8 shards every 4 steps
    assert len(log) == steps // every and all(len(d.shard_ids) == 2 for d in log)


def test_state_survives_a_restart(tmp_path):
    store = make_store(tmp_path / "store", 8)
    cfg = make_cfg(every=3)
    ref_log, log = [], []
    ref = RefreshScheduler(cfg, make_store(tmp_path / "ref", 8), run_pass=instant_pass(log=ref_log),
                           background=False, persist_every_s=1e9)
    for step in range(1, 61):
        ref.on_step(step)

    a = RefreshScheduler(cfg, store, run_pass=instant_pass(store, log), background=False, persist_every_s=0)
    for step in range(1, 32):
        a.on_step(step)
    before = a.status()
    del a                                                 # the actor dies; its memory is gone
    b = RefreshScheduler(cfg, store, run_pass=instant_pass(store, log), background=False, persist_every_s=0)
    st = b.status()
    assert st["restarts"] == 1 and st["passes"] == before["passes"] == 10
    assert st["last_step"] == 31 and st["ages"] == before["ages"] and st["pass_log"] == before["pass_log"]
    assert b.produced == {sid: store.current(sid)["produced_at_step"] for sid in store.shard_ids()}
    b.on_step(31)                                          # a retried call of a step already seen: ignored
    for step in range(32, 61):
        b.on_step(step)
    assert b.status()["passes"] == 20                     # the count continues
    # same decisions as a scheduler that never restarted
    assert [(d.step, d.shard_ids) for d in log] == [(d.step, d.shard_ids) for d in ref_log]
    assert b.status()["ages"] == ref.status()["ages"]
    assert store.state("scheduler")["passes"] == 20


class _Killed(BaseException):
    """Stands for the actor process dying mid-pass (not an error the scheduler catches)."""


def killed_in_the_pass_of_step_4(tmp_path):
    """8 shards, f=0.25, S=4: the actor dies in the pass of step 4 after committing its first shard."""
    store = make_store(tmp_path / "store", 8)
    cfg = make_cfg(every=4)

    def dies_after_one(decision, on_commit):
        sid = decision.shard_ids[0]
        fake_commit(store, sid, decision.step)
        on_commit(sid, {"produced_at_step": decision.step})
        raise _Killed()

    a = RefreshScheduler(cfg, store, run_pass=dies_after_one, background=False, persist_every_s=0)
    for step in (1, 2, 3):
        a.on_step(step)
    with pytest.raises(_Killed):
        a.on_step(4)
    return store, cfg


def test_pass_interrupted_by_a_restart_is_resumed(tmp_path):
    store, cfg = killed_in_the_pass_of_step_4(tmp_path)
    assert store.state("scheduler")["in_flight"]["shards"] == ["00000", "00001"]

    log = []
    b = RefreshScheduler(cfg, store, run_pass=instant_pass(store, log), background=False, persist_every_s=0)
    assert b.status()["phase"] == "resuming"
    b.on_step(5)
    assert [d.shard_ids for d in log] == [("00001",)]      # only the shard that had not landed
    entry = b.status()["pass_log"][-1]
    assert entry["start_step"] == 4 and entry["shards"] == 2 and entry["ok"]
    assert store.current("00001")["produced_at_step"] == 5 and store.state("scheduler")["in_flight"] is None
    for step in range(6, 9):
        b.on_step(step)
    assert [d.shard_ids for d in log][-1] == ("00002", "00003")   # the schedule goes on at step 8


def test_resumed_pass_takes_the_shards_that_went_overdue_in_the_outage(tmp_path):
    """Killed in the pass of step 4; back at step 30 (bound ceil(1/0.25) x 4 = 16): the resumed pass
    re-issues the uncommitted shard plus every shard now older than 16, oldest first."""
    store, cfg = killed_in_the_pass_of_step_4(tmp_path)
    log = []
    b = RefreshScheduler(cfg, store, run_pass=instant_pass(store, log), background=False, persist_every_s=0)
    b.on_step(30)
    # 00000 landed at step 4 (age 26 > 16 too, but it is the newest); the other 7 are aged 31
    assert log[0].shard_ids == ("00001",                                               # left uncommitted
                                "00002", "00003", "00004", "00005", "00006", "00007",  # aged 31
                                "00000")                                               # aged 26
    assert store.state("scheduler")["in_flight"] is None
    assert max(b.ages_at(30).values()) == 0


def test_failed_pass_is_retried_and_none_policy_never_decides(tmp_path):
    store = make_store(tmp_path / "store", 4)
    calls = []

    def flaky(decision, on_commit):
        calls.append(decision.shard_ids)
        if len(calls) == 1:
            raise RuntimeError("teacher replica died")
        return instant_pass()(decision, on_commit)

    s = RefreshScheduler(make_cfg(fraction=0.5, every=2), store, run_pass=flaky, background=False,
                         persist_every_s=1e9)
    for step in range(1, 5):
        s.on_step(step)
    # the retry takes the failed shards first (still the oldest) and, with them, every shard already
    # past the bound ceil(1/0.5) x 2 = 4: at step 4 all four initial shards are aged 5
    assert calls == [("00000", "00001"), ("00000", "00001", "00002", "00003")]
    st = s.status()
    assert st["failed_passes"] == 1 and st["passes"] == 1 and "teacher replica died" in st["pass_log"][0]["error"]

    none = RefreshScheduler(make_cfg(policy="none", fraction=0.0), make_store(tmp_path / "s2", 4),
                            run_pass=flaky, background=False, persist_every_s=1e9)
    assert all(none.on_step(step) is None for step in range(1, 50)) and len(calls) == 2
    assert none.status()["bound_steps"] is None and none.status()["max_age_seen"] == 49 + 1


def gated_scheduler(tmp_path, every, wait_s=10):
    """A background scheduler over 8 shards whose passes land only once the returned gate is set."""
    store = make_store(tmp_path / "store", 8)
    gate = threading.Event()

    def gated(decision, on_commit):
        gate.wait(wait_s)
        return instant_pass()(decision, on_commit)

    s = RefreshScheduler(make_cfg(every=every), store, run_pass=gated, background=True, persist_every_s=1e9)
    s._gc = lambda: None
    return s, gate


def test_background_pass_latency_counts_in_steps(tmp_path):
    """A pass in a thread: training steps go on meanwhile; commit_step is the first step that sees it."""
    s, gate = gated_scheduler(tmp_path, every=4)
    for step in range(1, 8):
        s.on_step(step)                 # decision at 4; steps 5..7 do not wait and start nothing new
    assert s.status()["phase"] == "running" and s.status()["passes"] == 0
    gate.set()
    s._thread.join(5)
    entry = s.status()["pass_log"][0]
    assert (entry["start_step"], entry["commit_step"]) == (4, 8)
    assert s.on_step(8) is not None        # due at 8: a new pass starts at once (and lands at once)
    assert s.drain(5) and s.status()["passes"] == 2
    assert s.on_step(12) is None and s.status()["phase"] == "stopped"   # drained: no new pass


def drive_with_latency(latency, *, every=4, steps=240, n_shards=8):
    """Background passes that land exactly `latency` steps after they start (commit_step - start_step)."""
    from raydistill.refresh.scheduler import Running

    sched = None

    def run(decision, on_commit):
        while sched.state.last_step < decision.step + latency - 1:
            time.sleep(0.0005)   # training goes on meanwhile
        return instant_pass()(decision, on_commit)

    sched = RefreshScheduler(make_cfg(every=every), MemoryStore(n_shards), run_pass=run, background=True,
                             persist_every_s=1e9)
    sched._gc = lambda: None
    for step in range(1, steps + 1):
        sched.on_step(step)
        if isinstance(sched.phase, Running) and step >= sched.phase.start_step + latency - 1:
            sched._thread.join(10)
    return sched.status()


@pytest.mark.parametrize("latency", [1, 3, 4])
def test_bound_plus_latency_when_passes_keep_up(latency):
    st = drive_with_latency(latency)
    assert st["max_latency_steps"] == latency and st["kept_up"]
    assert st["max_age_seen"] == st["bound_steps"] + latency          # the design's bound, attained
    assert all(p["start_step"] % 4 == 0 for p in st["pass_log"])       # decisions stay every S steps
    assert st["passes"] >= 240 // 4 - 1                                 # one per S steps (the last may be in flight)


def test_slow_passes_run_back_to_back_and_the_bound_grows_with_them():
    st = drive_with_latency(9)
    starts = [p["start_step"] for p in st["pass_log"]]
    assert starts[:4] == [4, 13, 22, 31] and not st["kept_up"]           # each waits for the previous one
    assert st["max_age_seen"] > st["bound_steps"] + 9                     # the design's bound is not kept...
    assert st["max_age_seen"] <= st["effective_bound_steps"] == 4 * 9 + 9  # ...this one is


def test_after_an_outage_every_overdue_shard_is_refreshed_at_once(tmp_path):
    """Steps 1-30 go unseen (the actor was down): at the next decision every shard past the bound
    is taken in one pass, not one quarter per period, so the oldest age falls back under the bound
    one pass later instead of ceil(1/f) passes later."""
    store = make_store(tmp_path / "store", 8)
    s = RefreshScheduler(make_cfg(fraction=0.25, every=4), store, run_pass=instant_pass(), background=False,
                         persist_every_s=1e9)
    for step in range(1, 9):
        s.on_step(step)
    assert s.status()["passes"] == 2
    d = s.on_step(40)                                     # an outage: steps 9-39 never reached the actor
    assert d is not None and len(d.shard_ids) == 8        # all 8 are past the bound of 16
    assert max(a for a in s.ages_at(40).values()) == 0
    for step in range(41, 120):
        s.on_step(step)
    st = s.status()
    after = [a["max_age"] for a in st["ages"] if a["step"] > 40]
    assert after and max(after) <= st["bound_steps"]      # and the schedule is bounded again


# ------------------------------------------------------------------ the enforced bound (issue 11), no cluster

def test_wait_until_fresh_starts_the_overdue_shards_and_counts_the_stall(tmp_path):
    """A pass lands only when the test lets it: a trainer asking before step 18 (max_age 16, the
    initial shards aged 19) makes the idle scheduler start the overdue shards at once, blocks until
    they land, and the stall is counted once per step and charged to that pass."""
    s, gate = gated_scheduler(tmp_path, every=100, wait_s=30)
    assert s.max_age == 4 * 100 and s.wait_until_fresh(3, timeout=0.1)["fresh"]      # nothing overdue yet
    s.cfg.refresh.max_age = s.max_age = 16
    for step in range(1, 18):
        s.on_step(step)                      # no decision due (every 100), nothing launched
    assert s.status()["passes"] == 0 and s.status()["phase"] == "idle"
    quick = s.wait_until_fresh(18, timeout=5, block=False)
    assert not quick["fresh"] and quick["min_produced"] == -1 and quick["stalled_s"] == 0
    threading.Timer(1.0, gate.set).start()
    res = s.wait_until_fresh(18, timeout=30)
    assert res["fresh"] and res["min_produced"] == 18 and res["stalled_s"] >= 0.9
    st = s.status()
    assert st["stall_steps"] == 1 and st["stall_seconds"] >= 0.9 and not st["kept_up"]
    s._thread.join(10)
    st = s.status()
    entry = st["pass_log"][0]
    assert entry["shards"] == 8 and entry["start_step"] == 18 and entry["stall_steps"] == 1
    assert entry["stall_s"] >= 0.9 and st["stall_share"] > 0
    assert max(s.ages_at(18).values()) == 0 and st["in_flight"] is None and st["passes"] == 1


def test_wait_survives_a_restart_of_the_scheduler(tmp_path):
    """Killed in the pass of step 4 while a trainer waits; the restarted scheduler, asked again by
    the same trainer, resumes that pass (the shard not yet committed) and answers fresh."""
    store, cfg = killed_in_the_pass_of_step_4(tmp_path)
    cfg.refresh.max_age = 4
    log = []
    b = RefreshScheduler(cfg, store, run_pass=instant_pass(store, log), background=False, persist_every_s=0)
    res = b.wait_until_fresh(5, timeout=5)
    assert res["fresh"] and res["min_produced"] >= 1
    assert log[0].shard_ids[0] == "00001"                   # the resumed pass first
    assert all(store.current(sid)["produced_at_step"] >= 1 for sid in store.shard_ids())
    assert b.status()["restarts"] == 1 and b.status()["pass_log"][0]["start_step"] == 4


def test_prefetch_starts_a_pass_one_latency_ahead_of_the_bound(tmp_path):
    """With prefetch (a trainer enforcing max_age 16) and passes known to take 3 steps, the
    initial shards (produced at -1) are started at step 12, when step 12 + 1 + 3 would see them
    aged 17; without prefetch nothing starts (no decision due: every_steps 100)."""
    def run(prefetch):
        log = []
        s = RefreshScheduler(make_cfg(every=100), make_store(tmp_path / f"s{prefetch}", 8),
                             run_pass=instant_pass(log=log), background=False, persist_every_s=1e9)
        s.cfg.refresh.max_age = s.max_age = 16
        s.state.pass_log = [{"start_step": 0, "commit_step": 3}]     # the latency seen so far
        for step in range(1, 16):
            s.on_step(step, prefetch=prefetch)
        return log, s

    log, s = run(True)
    assert [(d.step, len(d.shard_ids)) for d in log] == [(12, 8)] and "max_age 16" in log[0].reason
    assert s.status()["max_age_seen"] <= 16
    log, s = run(False)
    assert log == [] and s.status()["max_age_seen"] == 16


# ------------------------------------------------------------------ honest status (issue 12 item 7)

def test_status_does_not_claim_the_bound_when_passes_fail():
    """One pass in five fails: the ages go past the latency formula, so status must not call the
    run kept up nor state that formula as its bound (it did: kept_up true, effective 20 < max age)."""
    calls = []

    def every_fifth_fails(decision, on_commit):
        calls.append(decision.step)
        if len(calls) % 5 == 0:
            raise RuntimeError("teacher replica died")
        return instant_pass()(decision, on_commit)

    s = RefreshScheduler(make_cfg(every=4), MemoryStore(8), run_pass=every_fifth_fails, background=False,
                         persist_every_s=1e9)
    for step in range(1, 201):
        s.on_step(step)
    st = s.status()
    assert st["failed_passes"] == len(calls) // 5 > 0
    assert st["max_age_seen"] > st["bound_steps"]                     # failures did cost age
    assert not st["kept_up"] and "failed pass" in " ".join(st["not_kept_up_because"])
    assert st["effective_bound_steps"] is None                        # no formula is claimed
    assert st["bound_held"] is False and st["max_age"] == st["bound_steps"] == 16


def test_status_counts_steps_the_scheduler_never_saw(tmp_path):
    s = RefreshScheduler(make_cfg(every=4), MemoryStore(8), run_pass=instant_pass(), background=False,
                         persist_every_s=1e9)
    for step in list(range(1, 11)) + list(range(21, 26)):   # steps 11-20 lost (an outage)
        s.on_step(step)
    st = s.status()
    assert st["unseen_steps"] == 10 and not st["kept_up"]
    assert st["max_age_seen"] <= st["max_age"] and st["bound_held"] is None   # unknown, not "held"
    s.on_step(19)                                            # a late delivery is seen after all
    assert s.status()["unseen_steps"] == 9


def test_a_burst_of_late_calls_is_not_a_rewind_but_a_new_client_going_back_is(tmp_path):
    """Calls queued while the actor restarted arrive in a burst, in any order (threaded actor): from
    the client already seen, a step far behind the newest is a late delivery (no rewind, no new
    decision, no age record); a new client (a fit resumed from a checkpoint) going back rewinds."""
    s = RefreshScheduler(make_cfg(every=4), MemoryStore(8), run_pass=instant_pass(), background=False,
                         persist_every_s=1e9)
    for step in range(1, 11):
        s.on_step(step, client="fit-a")
    for step in range(31, 41):
        s.on_step(step, client="fit-a")
    passes, n_ages = s.status()["passes"], len(s.state.ages)
    assert s.status()["unseen_steps"] == 20
    for step in (12, 25, 11):                              # 29, 16 and 30 steps behind the newest
        assert s.on_step(step, client="fit-a") is None
    st = s.status()
    assert st["last_step"] == 40 and st["passes"] == passes and len(s.state.ages) == n_ages
    assert st["unseen_steps"] == 17                        # seen after all
    s.on_step(20, client="fit-b")                          # resumed from the checkpoint of step 19
    assert s.status()["last_step"] == 20 and s.state.last_slot <= 20
    assert s.on_step(39, client="fit-a") is None           # the old attempt's late call changes nothing
    assert s.status()["last_step"] == 20
    s.on_step(21, client="fit-b")
    assert s.status()["last_step"] == 21 and s.state.ages[-1][0] == 21
