"""The refresh scheduler: a plain-class state machine that keeps every cached soft target within
an age bound (`actor.py` wraps it as a named Ray actor at launch).

Events come from train rank 0 (`client.py`): `on_step(step)` after every optimizer step (fire and
forget), and — with `refresh.enforce: wait` — `wait_until_fresh(step)` before a step that could
break the bound. Each event calls `_step`, the one function that looks at the phase and decides;
`_set_phase` is the one place the phase changes. Phases are data (`Idle`, `Running(decision,
start_step)`, `Resuming(in_flight)`, `Stopped`); they never call back into the scheduler.

Schedule: every `refresh.every_steps` steps the policy picks ceil(fraction × n_shards) shards
(`policy.py`), and every shard already past the design bound rides along (after an outage or a
failed pass, so a backlog clears in one pass). One pass at a time, in a background thread on the
long-lived `TeacherPool`; new versions are committed shard by shard and the trainer picks them up
at its next epoch start. A decision falling due during a pass starts as soon as the pass ends.

The enforced bound (`refresh.max_age`, default ceil(1/fraction) × every_steps): age of a shard at
step s = s − `produced_at_step` of its current version. `wait_until_fresh(s)` returns once every
shard's produced_at_step >= s − max_age, starting the overdue shards at once if no pass is running
(ahead of the schedule). `on_step(s, prefetch=True)` starts them a pass's latency early, so that
training seldom has to wait. Stalls (seconds and steps) are counted per pass; when the stall share
of the last passes exceeds `refresh.max_stall_share`, the pool grows by one replica (up to
`refresh.max_replicas`).

Calls arrive out of order (a threaded actor; calls queued while it restarted come in a burst):
each trainer client (one per fit attempt) sends its id, so an older step from the newest client
is a late delivery and only a new client going back is a rewind (training resumed from a
checkpoint); calls of a superseded client are ignored.

Ages are recorded at every step the scheduler sees, *after* that step's decision; a pass's
`commit_step` is the first step whose record sees all of its commits, so `commit_step −
start_step` is its latency in steps (0 for a pass that completes instantly).

Durable state (`SchedulerState`, in the store manifest under `state.scheduler`; a restarted actor
resumes from it, and a pass it had in flight is resumed over the shards not yet committed — its
log entry keeps the original start_step, so its latency includes the outage).
"""
from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass, field
from typing import ClassVar

from ..log import log
from ..teachers import max_ages, produced_by_teacher
from .policy import RefreshDecision, bound_steps, effective_bound, make_policy, older_than, shards_per_decision
from .status import bound_figures, max_latency, window_stall_share

STATE_KEY = "scheduler"
# The state is rewritten with the manifest at every decision: keep it small whatever the run length.
MAX_AGES = 2048        # age records kept (older ones are thinned, keeping the larger max_age)
MAX_PASS_LOG = 500     # pass log entries kept (the counters keep counting)
REORDER_WINDOW = 8     # without a client id: an on_step this far behind the newest is a late delivery
MAX_CLIENTS = 16       # trainer client ids remembered (one per fit attempt)
GROWTH_WINDOW = 3      # passes over which the stall share is judged for growing the pool
MAX_FAILED_IN_A_ROW = 3  # consecutive failed passes after which a waiting trainer gets the error


# ---------------------------------------------------------------- typed state and phases

@dataclass
class SchedulerState:
    """What survives the actor: everything the status and a resumed schedule need."""
    policy: str
    fraction: float
    every_steps: int
    source: str
    run: str
    passes: int = 0
    failed_passes: int = 0
    rows_refreshed: int = 0
    teacher_tokens: int = 0
    generated_tokens: int = 0
    last_step: int = 0            # newest student step seen
    last_slot: int = 0            # schedule slot of the last decision (decisions are due at last_slot + S)
    max_age_seen: int | None = None
    max_age_seen_by_teacher: dict = field(default_factory=dict)  # several teachers: {name: max age seen}
    restarts: int = 0
    ages: list = field(default_factory=list)      # [[step, max_age, mean_age]], thinned to MAX_AGES
    pass_log: list = field(default_factory=list)  # [{start_step, commit_step, shards, rows, ..., ok}]
    in_flight: dict | None = None                 # {start_step, slot, shards, reason, step, ...}
    unseen_steps: int = 0         # steps never delivered (an outage): their ages were not recorded
    stall_seconds: float = 0.0    # training time spent waiting for the bound
    stall_steps: int = 0          # steps that waited
    last_stalled_step: int = -1
    train_started_at: float | None = None   # wall clock of the first event from training
    last_seen_at: float | None = None
    pool_size: int = 0            # replicas the pool has grown to (a restart starts it at that size)
    failed_in_a_row: int = 0
    clients: list = field(default_factory=list)   # ids of the trainer clients seen, newest last

    @classmethod
    def restore(cls, saved: dict, **fixed) -> "SchedulerState":
        names = {f.name for f in dataclasses.fields(cls)} - set(fixed)
        return cls(**fixed, **{k: v for k, v in saved.items() if k in names})


@dataclass(frozen=True)
class Idle:
    """No pass running: a due decision starts one."""
    name: ClassVar[str] = "idle"


@dataclass(frozen=True)
class Running:
    """A pass is in flight: due decisions wait for it."""
    decision: RefreshDecision
    start_step: int
    name: ClassVar[str] = "running"


@dataclass(frozen=True)
class Resuming:
    """Restarted with a pass in flight: the next event re-issues the shards it had not committed."""
    in_flight: dict
    name: ClassVar[str] = "resuming"


@dataclass(frozen=True)
class Stopped:
    """Drained at the end of training: ages are still recorded, no pass starts."""
    name: ClassVar[str] = "stopped"


# ---------------------------------------------------------------- the state machine

class RefreshScheduler:
    """Decides and runs refresh passes; see the module docstring.

    run_pass(decision, on_commit) -> stats runs one pass synchronously and calls
    on_commit(shard_id, record) for each committed shard (record has produced_at_step); the
    default is a real teacher pass on the pool. background=False runs passes inline (tests).
    """

    def __init__(self, cfg, store, *, vocab_size: int | None = None, teacher_rev: str | None = None,
                 policy_dir: str | None = None, run_pass=None, background: bool = True,
                 persist_every_s: float = 1.0, metrics=None, teacher_fault: dict | None = None):
        r = cfg.refresh
        self.teacher_fault = teacher_fault  # test hook read on the driver (faults.teacher_fault)
        self.cfg, self.store = cfg, store
        self.vocab_size, self.teacher_rev, self.policy_dir = vocab_size, teacher_rev, policy_dir
        self.policy = make_policy(r.policy, r.seed) if r.fraction > 0 else None
        self.fraction, self.every = float(r.fraction), int(r.every_steps)
        self.max_age = (r.max_age or bound_steps(self.fraction, self.every)) if self.policy else None
        self.background, self.persist_every_s = background, float(persist_every_s)
        self._run_pass = run_pass or self._teacher_pass
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)   # a commit landed, or the phase moved
        self._thread: threading.Thread | None = None
        self._pools: dict = {}  # long-lived refresh replicas by teacher name (None: the run's one teacher)
        self._last_persist = 0.0
        self._dirty = False
        self._draining = False
        self._warned_slow = False
        self.fatal: str | None = None   # an error no retry can fix (a pool that cannot be placed)
        if metrics is None:
            from ..metrics import RunMetrics
            metrics = RunMetrics(cfg.run.name)
        self.metrics = metrics

        m = store.manifest()
        self.shard_ids = store._trained_ids(m)  # the shards training reads (no mixture components)
        self.produced: dict[str, int | None] = {}
        self.produced_by: dict[str, dict[str, int]] = {}  # several teachers: each one's part of a shard
        for sid in self.shard_ids:
            rec = store._current(m, sid)
            self.produced[sid] = None if rec is None else int(rec["produced_at_step"])
            self.produced_by[sid] = produced_by_teacher(rec)
        saved = (m.get("state") or {}).get(STATE_KEY) or {}
        if saved and saved.get("run") != cfg.run.name:
            log(f"refresh state in {store.uri} belongs to run {saved.get('run')!r}, not {cfg.run.name!r}: "
                f"starting afresh")
            saved = {}
        self.state = SchedulerState.restore(saved, policy=r.policy, fraction=self.fraction,
                                            every_steps=self.every, source=r.source, run=cfg.run.name)
        self.phase = Idle()
        if saved:
            self.state.restarts += 1
            if self.state.in_flight:
                self.phase = Resuming(self.state.in_flight)
            log(f"refresh scheduler resumed from {store.uri} (passes {self.state.passes}, last step "
                f"{self.state.last_step}, pass in flight: {bool(self.state.in_flight)})")
            self._persist(force=True)

    # ------------------------------------------------------------ policy logic (pure)
    def ages_at(self, step: int) -> dict[str, int | None]:
        """{shard_id: age at `step`} (None: the shard has no current version)."""
        return {sid: None if p is None else step - p for sid, p in self.produced.items()}

    def overdue(self, ages: dict[str, int | None]) -> list[str]:
        """Round robin: the shards older than its bound (or without a version), oldest first."""
        bound = bound_steps(self.fraction, self.every)
        if self.policy is None or not self.policy.bounded or bound is None:
            return []
        return older_than(ages, bound)

    def decide(self, step: int, ages: dict[str, int | None]) -> RefreshDecision | None:
        """A decision if one is due at `step` (every `every_steps` steps), else None."""
        if self.policy is None or not ages:
            return None
        S, last = self.every, int(self.state.last_slot)
        if step < last + S:
            return None
        # Catch up at most one slot: after a long outage one extra pass, not a burst of them.
        slot = max(last + S, (step // S - 1) * S)
        k = shards_per_decision(self.fraction, len(ages))
        # Shards already past the bound (after an outage, or behind slow passes) all go in this
        # pass rather than waiting for their turn. While passes keep up none is ever past it.
        k = max(k, len(self.overdue(ages)))
        ids = tuple(self.policy.select(ages, k, step))
        known = [a for a in ages.values() if a is not None]
        oldest = max(known) if known else None
        return RefreshDecision(ids, f"{self.policy.name}: step {step} (slot {slot}), {k} of {len(ages)} "
                                    f"shards, oldest age {oldest}", step=step, slot=slot)

    def urgent(self, step: int, need: int) -> RefreshDecision | None:
        """The shards that would be older than max_age at step `need`, as a decision now (ahead of
        the schedule: the slot is left as it is)."""
        if self.policy is None or self.max_age is None:
            return None
        ids = tuple(older_than(self.ages_at(need), self.max_age))
        if not ids:
            return None
        return RefreshDecision(ids, f"bound: {len(ids)} shard(s) would pass max_age {self.max_age} at step "
                                    f"{need}", step=step, slot=int(self.state.last_slot))

    def _resume(self, in_flight: dict, step: int) -> RefreshDecision | None:
        """The decision that finishes a pass interrupted by a restart (None: everything had landed)."""
        left = tuple(sid for sid in in_flight["shards"]
                     if self.produced.get(sid) is None or self.produced[sid] < in_flight["start_step"])
        if not left:
            return None
        # Shards that went past the bound during the outage ride along: waiting for the next
        # decision would add a whole pass to their age.
        overdue = tuple(sid for sid in self.overdue(self.ages_at(step)) if sid not in left)
        return RefreshDecision(left + overdue, f"resume the pass of step {in_flight['start_step']} after a "
                               f"restart ({len(left)} of {len(in_flight['shards'])} shards left, "
                               f"{len(overdue)} overdue)", step=step, slot=in_flight["slot"])

    # ------------------------------------------------------------ the step function
    def _step(self, step: int, need: int | None = None) -> RefreshDecision | None:
        """Look at the phase and decide (the only caller of _launch). `need`: a step by which every
        shard must be within max_age (a trainer enforcing the bound)."""
        phase = self.phase
        if isinstance(phase, (Running, Stopped)):
            return None
        if isinstance(phase, Resuming):
            decision = self._resume(phase.in_flight, step)
            if decision is not None:
                original = list(phase.in_flight["shards"]) + [s for s in decision.shard_ids
                                                               if s not in phase.in_flight["shards"]]
                return self._launch(decision, start_step=phase.in_flight["start_step"], original=original)
            self._close_pass({"rows": 0, "tokens": 0, "seconds": 0.0, "complete": True, "resumed": True},
                             phase.in_flight, commit_step=step)
            self._set_phase(Idle())
        decision = self.decide(step, self.ages_at(step))
        extra = self.urgent(step, need) if need is not None else None
        if extra is not None and decision is not None:  # a due pass also takes what the bound needs
            ids = decision.shard_ids + tuple(s for s in extra.shard_ids if s not in decision.shard_ids)
            decision = dataclasses.replace(decision, shard_ids=ids, reason=f"{decision.reason}; {extra.reason}")
        decision = decision or extra
        return self._launch(decision, start_step=step) if decision is not None else None

    def _set_phase(self, phase) -> None:
        """The one place the phase changes; wakes every waiter."""
        self.phase = phase
        self._changed.notify_all()

    # ------------------------------------------------------------ events
    def on_step(self, step: int, prefetch: bool = False, client: str | None = None) -> RefreshDecision | None:
        """Student step `step` is done (train rank 0, fire and forget). `prefetch` (a trainer that
        enforces the bound): also start the shards that would pass max_age before a pass started
        now could land (the latency of the recent passes, plus one step). `client`: the id of the
        trainer client sending it (one per fit attempt), which tells a rewind from a late delivery."""
        step = int(step)
        with self._lock:
            st, last = self.state, int(self.state.last_step)
            self._seen_now()
            if client is not None and client in st.clients[:-1]:
                return None  # a late call of an attempt a newer one superseded: its steps are history
            known = client is None or client in st.clients
            if step <= last:
                # A threaded actor runs calls out of order, and calls queued while it restarted arrive
                # in a burst: from a client already seen, an older step is always a late delivery. Only
                # a new client (training resumed from a checkpoint) going back is a rewind.
                late = step == last or (known and (client is not None or last - step <= REORDER_WINDOW))
                if late:
                    if step < last and st.unseen_steps:
                        st.unseen_steps -= 1   # a late delivery: seen after all
                    return None  # duplicate or late delivery (threaded actor, retried call)
                # Training went back (resumed from an older checkpoint, or a new run on this store).
                log(f"refresh scheduler saw step {step} after {last}: training rewound")
                st.last_slot = min(int(st.last_slot), step - step % self.every)
            elif step > last + 1:
                st.unseen_steps += step - last - 1
            if not known:
                st.clients = (st.clients + [client])[-MAX_CLIENTS:]
            st.last_step = step
            need = step + 1 + self._lead_steps() if prefetch else None
            decision = self._step(step, need)
            self._record_ages(step)
            self._persist()  # a decision was persisted when it launched
            return decision

    def wait_until_fresh(self, step: int, timeout: float = 5.0, block: bool = True) -> dict:
        """Train rank 0, before step `step`: return once every shard's produced_at_step >= step −
        max_age (starting the overdue shards now if no pass runs), or after `timeout` s (the caller
        asks again: a restarted actor then resumes the wait). `block=False`: answer at once.
        Returns {fresh, min_produced, max_age, stalled_s, error}."""
        step = int(step)
        start = charged = time.monotonic()
        waited_for = None   # the pass training waits for: its log entry is charged the stall
        with self._lock:
            self._seen_now()
            while True:
                lo = self._min_produced()
                fresh = self.max_age is None or (lo is not None and lo >= step - self.max_age)
                now = time.monotonic()
                if waited_for is not None:  # charged slice by slice: the growth rule sees it at once
                    self._charge(waited_for, now - charged)
                    charged = now
                if fresh or not block or self.fatal or now - start >= timeout:
                    break
                if waited_for is None:
                    self._step(step, need=step)
                    waited_for = self.state.in_flight or {}
                    if self.state.last_stalled_step != step:
                        self.state.last_stalled_step = step
                        self.state.stall_steps += 1
                        self._charge(waited_for, 0.0, steps=1)
                elif isinstance(self.phase, Idle):
                    self._step(step, need=step)   # the pass ended without them: start the rest
                    waited_for = self.state.in_flight or waited_for
                self._changed.wait(min(timeout - (now - start), 1.0))
            stalled = charged - start
            if stalled:
                self.metrics.refresh_stall(stalled)
                self._dirty = True
                self._persist()
            return {"fresh": bool(fresh), "min_produced": lo, "max_age": self.max_age,
                    "stalled_s": stalled, "error": self.fatal}

    def _min_produced(self) -> int | None:
        vals = list(self.produced.values())
        return None if not vals or any(v is None for v in vals) else min(vals)

    def _lead_steps(self) -> int:
        """Steps a pass started now is expected to take: the slowest of the last few."""
        return max_latency(self.state.pass_log[-GROWTH_WINDOW:])

    def _seen_now(self) -> None:
        now = time.time()
        if self.state.train_started_at is None:
            self.state.train_started_at = now
        self.state.last_seen_at = now

    def _charge(self, in_flight: dict, seconds: float, steps: int = 0) -> None:
        """Count a stall, charged to the pass training waits for: still in flight, or in the log
        by now (found by its start time)."""
        self.state.stall_seconds += seconds
        target = in_flight
        if in_flight is not self.state.in_flight:
            target = next((p for p in reversed(self.state.pass_log)
                           if in_flight and p.get("started_at") == in_flight.get("started_at")), None)
        if target is not None:
            target["stall_s"] = round(target.get("stall_s", 0.0) + seconds, 3)
            target["stall_steps"] = target.get("stall_steps", 0) + steps

    # ------------------------------------------------------------ passes
    def _launch(self, decision: RefreshDecision, *, start_step: int, original=None) -> RefreshDecision:
        """Record the decision durably, then run its pass (background thread or inline)."""
        self.state.last_slot = decision.slot
        self.state.in_flight = {"start_step": start_step, "slot": decision.slot,
                                "shards": list(original or decision.shard_ids), "reason": decision.reason,
                                "step": decision.step, "started_at": time.time()}
        self._persist(force=True)
        log(f"refresh pass at step {decision.step}: {decision.reason}")
        self._set_phase(Running(decision, start_step))  # set before the thread can finish and set Idle
        if self.background:
            self._thread = threading.Thread(target=self._pass_body, args=(decision,), daemon=True,
                                            name=f"refresh-{decision.step}")
            self._thread.start()
        else:
            self._pass_body(decision)
        return decision

    def _on_commit(self, shard_id: str, record: dict) -> None:
        with self._lock:
            self.produced[shard_id] = int(record["produced_at_step"])
            self.produced_by[shard_id] = produced_by_teacher(record)
            self._changed.notify_all()

    def _pass_body(self, decision: RefreshDecision) -> None:
        from .pool import PoolPlacementError

        start = time.perf_counter()
        try:
            stats, error = self._run_pass(decision, self._on_commit) or {}, None
        except Exception as e:  # a failed pass is logged; its shards stay oldest and are picked next
            stats, error = {}, f"{type(e).__name__}: {e}"
            log(f"refresh pass of step {decision.step} failed: {error}", warning=True)
            if isinstance(e, PoolPlacementError):
                self.fatal = str(e)
        stats.setdefault("seconds", time.perf_counter() - start)
        with self._lock:
            in_flight = self.state.in_flight or {"start_step": decision.step, "shards": list(decision.shard_ids)}
            # Inline passes land before the step's age record; a background pass is first seen
            # by the record of the step after the newest one seen now.
            commit_step = decision.step if not self.background else int(self.state.last_step) + 1
            if error:
                stats["error"] = error
            self._close_pass(stats, in_flight, commit_step=commit_step)
            self._set_phase(Stopped() if self._draining else Idle())
        if self.background:
            self._gc()

    def _close_pass(self, stats: dict, in_flight: dict, *, commit_step: int) -> None:
        st = self.state
        ok = not stats.get("error") and stats.get("complete", True)
        entry = {"start_step": int(in_flight["start_step"]), "commit_step": int(commit_step),
                 "shards": len(in_flight["shards"]), "rows": int(stats.get("rows", 0)),
                 "tokens": int(stats.get("tokens", 0)), "seconds": round(float(stats.get("seconds", 0.0)), 3),
                 "source": st.source, "ok": bool(ok), "stall_s": in_flight.get("stall_s", 0.0),
                 "stall_steps": in_flight.get("stall_steps", 0)}
        if "started_at" in in_flight:
            entry.update(started_at=in_flight["started_at"], ended_at=time.time())
        for k in ("error", "policy_version", "generated_tokens", "teacher_rev", "resumed", "replicas", "teachers"):
            if k in stats:
                entry[k] = stats[k]
        st.pass_log = (st.pass_log + [entry])[-MAX_PASS_LOG:]
        latency = entry["commit_step"] - entry["start_step"]
        if latency > self.every and not self._warned_slow:
            self._warned_slow = True
            enforced = self.cfg.refresh.enforce == "wait"
            log(f"a refresh pass took {latency} steps, more than refresh.every_steps={self.every}: passes run "
                f"back to back" + (f"; training waits to keep max_age {self.max_age}" if enforced else
                                   f" and the age bound becomes {effective_bound(self.fraction, self.every, latency)} "
                                   f"steps instead of {bound_steps(self.fraction, self.every)} + {latency}") +
                " — raise refresh.max_replicas or refresh.every_steps", warning=True)
        if ok:
            st.passes += 1
            st.failed_in_a_row = 0
        else:
            st.failed_passes += 1
            st.failed_in_a_row += 1
            if st.failed_in_a_row >= MAX_FAILED_IN_A_ROW and self.cfg.refresh.enforce == "wait":
                self.fatal = self.fatal or (f"refresh: {st.failed_in_a_row} passes in a row failed, the last with "
                                            f"{entry.get('error', 'an incomplete pass')} — training cannot keep "
                                            f"refresh.max_age {self.max_age}; fix the teacher pass or set "
                                            f"refresh.enforce=warn")
        st.rows_refreshed += entry["rows"]
        st.teacher_tokens += entry["tokens"]
        st.generated_tokens += int(stats.get("generated_tokens", 0))
        st.in_flight = None
        self.metrics.refresh_pass(entry["rows"])
        if entry["stall_s"]:
            log(f"refresh pass of step {entry['start_step']}: training waited {entry['stall_s']:.1f} s over "
                f"{entry['stall_steps']} step(s) for it (stall so far {st.stall_seconds:.1f} s)")
        self._maybe_grow()
        self._persist(force=True)

    def _maybe_grow(self) -> None:
        """One more replica when training waited too long over the last passes (up to max_replicas)."""
        share = window_stall_share(self.state.pass_log, GROWTH_WINDOW)
        r = self.cfg.refresh
        pools = [p for p in self._pools.values() if p.size < r.max_replicas]
        if not pools or share <= r.max_stall_share:
            return
        for pool in pools:  # several teachers: each teacher's pool (a pass waits for the slowest)
            pool.grow(1)
        self.state.pool_size = max(p.size for p in self._pools.values())
        log(f"refresh: training waited {share:.0%} of the time over the last passes (> refresh.max_stall_share "
            f"{r.max_stall_share:g}): the refresh pool grows to {self.state.pool_size} replica(s) of "
            f"{r.max_replicas}")

    def _record_ages(self, step: int) -> None:
        known = [step - p for p in self.produced.values() if p is not None]
        if not known:
            return
        mx, mean = max(known), sum(known) / len(known)
        ages = self.state.ages  # [step, max_age, mean_age] rows: compact in the manifest's JSON
        ages.append([step, mx, round(mean, 3)])
        if len(ages) > MAX_AGES:  # thin: merge neighbours, keeping the one with the larger max age
            head = ages[:-1]
            ages[:] = [max(head[i:i + 2], key=lambda a: a[1]) for i in range(0, len(head), 2)] + ages[-1:]
        seen = self.state.max_age_seen
        self.state.max_age_seen = mx if seen is None else max(seen, mx)
        by = self.state.max_age_seen_by_teacher
        for name, age in max_ages(self.produced_by, step).items():
            by[name] = max(by.get(name, age), age)
        self.metrics.shard_ages(mx, mean)
        self._dirty = True

    def _persist(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and (not self._dirty or now - self._last_persist < self.persist_every_s):
            return
        self.store.update_state(STATE_KEY, dataclasses.asdict(self.state))
        self._last_persist, self._dirty = now, False

    def _gc(self) -> None:
        try:
            self.store.gc(keep=max(2, self.cfg.targets.keep_versions))
        except Exception as e:  # housekeeping must not stop refreshes
            log(f"store gc after a refresh failed: {e}", warning=True)

    # ------------------------------------------------------------ control and status
    def ping(self) -> bool:
        return True

    def drain(self, timeout: float | None = None) -> bool:
        """Stop deciding; wait up to `timeout` s for a pass in flight. True if none is left."""
        with self._lock:
            self._draining = True
            if not isinstance(self.phase, Running):
                self._set_phase(Stopped())
            thread = self._thread
        if thread is not None:
            thread.join(timeout)
        with self._lock:
            self._persist(force=True)
            done = self.state.in_flight is None
        if done:
            self.close_pool()  # hand the replicas' CPUs/GPUs back before evaluation
        return done

    def status(self) -> dict:
        """The figures for the report (see `actor.scheduler_status`)."""
        with self._lock:
            st = self.state
            return {"policy": st.policy, "fraction": self.fraction, "every_steps": self.every,
                    "source": st.source, "enforce": self.cfg.refresh.enforce, "passes": st.passes,
                    "failed_passes": st.failed_passes, "rows_refreshed": st.rows_refreshed,
                    "teacher_tokens": st.teacher_tokens, "generated_tokens": st.generated_tokens,
                    "max_age_seen": st.max_age_seen, "max_age_seen_by_teacher": dict(st.max_age_seen_by_teacher),
                    **bound_figures(st, fraction=self.fraction, every=self.every, max_age=self.max_age,
                                    has_policy=self.policy is not None),
                    "pool_replicas": sum(p.size for p in self._pools.values()) or st.pool_size,
                    "restarts": st.restarts, "last_step": st.last_step, "phase": self.phase.name,
                    "in_flight": st.in_flight, "shards": len(self.shard_ids), "error": self.fatal,
                    "ages": [{"step": a[0], "max_age": a[1], "mean_age": a[2]} for a in st.ages],
                    "pass_log": [dict(p) for p in st.pass_log]}

    # ------------------------------------------------------------ the real pass
    @property
    def _pool(self):
        """The one teacher's refresh pool (None before the first pass)."""
        return self._pools.get(None)

    def _teacher_pool(self, teacher_rev: str, name: str | None = None):
        """The long-lived refresh replicas of the teacher (`name`: one of several, placed as its own
        entry says), reloaded only when that teacher's revision changes."""
        from .pool import TeacherPool

        pool = self._pools.get(name)
        if pool is not None and pool.teacher_rev != teacher_rev:
            pool.close()
            pool = None
        if pool is None:
            from ..teachers import for_teacher

            cfg = self.cfg if name is None else for_teacher(self.cfg, name)
            size = max(min(cfg.teacher.replicas, self.cfg.refresh.max_replicas), self.state.pool_size)
            pool = self._pools[name] = TeacherPool(cfg, self.store, vocab_size=self.vocab_size, size=size,
                                                   teacher_rev=teacher_rev,
                                                   place_timeout_s=self.cfg.run.resource_wait_s,
                                                   fault=self.teacher_fault)
            self.state.pool_size = max(p.size for p in self._pools.values())
        return pool

    def close_pool(self) -> None:
        pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            pool.close()

    def _teacher_pass(self, decision: RefreshDecision, on_commit) -> dict:
        from .passes import teacher_pass

        return teacher_pass(self.cfg, self.store, decision, on_commit, pool_for=self._teacher_pool,
                            vocab_size=self.vocab_size, policy_dir=self.policy_dir, metrics=self.metrics)
