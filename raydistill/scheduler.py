"""The refresh scheduler: teacher passes that keep every cached soft target within an age bound.

`RefreshScheduler` is a plain class (a small state machine; no Ray import at module level) that
`start_scheduler` wraps as a named Ray actor. Rank 0 of the trainer calls `on_step(step)` after
every optimizer step, fire and forget. The scheduler records the shards' ages at that step and,
every `refresh.every_steps` steps, asks its policy for `ceil(refresh.fraction × n_shards)` shards:

- `RoundRobin`: the oldest first (ties by shard id). Every shard is then re-produced at least once
  every ceil(1/fraction) decisions, so no shard is ever older than
  `bound_steps = ceil(1/fraction) × every_steps` plus the latency L of one pass (in steps) — as
  long as a pass takes at most every_steps steps. A slower pass delays the next decision (one pass
  at a time), decisions are then L apart and the bound is ceil(1/fraction) × max(every_steps, L) + L
  (`effective_bound`; the scheduler warns once and reports `kept_up: false`). A decision also
  takes every shard already past ceil(1/fraction) × every_steps (after an outage of the actor or
  a failed pass), so such a backlog clears in one pass instead of ceil(1/fraction);
- `Random(seed)`: uniform, no bound; it exists to show the age tail that round robin removes.

A decision starts a teacher pass in a background thread (`run_teacher_pass` on a `TeacherPool`
of long-lived replicas, min(teacher.replicas, refresh.max_replicas), that load the teacher once per
revision instead of once per pass), so training never waits; new shard versions are committed one by one as
they land, and the trainer picks them up at its next epoch start. While a pass runs no other
starts: a decision falling due meanwhile starts as soon as the pass ends.

What a refresh produces (`refresh.source`):

- `teacher`: the same inputs re-scored; the teacher revision is re-read at every pass
  (`models.model_revision`), so a new checkpoint written at `teacher.model` is picked up.
- `resample`: a fresh `sampled` draw (a new seed per pass). With `targets.format=topk` the
  teacher is deterministic and a resample re-scores identically: it only costs compute.
- `on_policy`: the latest student, saved by train rank 0 at `<output_dir>/policy/latest`
  (`fit_student(policy_dir=, policy_every=)`), continues the first half of each of the shard's
  corpus sequences up to `data.seq_len` tokens (sampling at temperature 1, in Ray tasks placed like
  teacher replicas); the continuations are written to `inputs/policy/<shard>-<step>.parquet` (same
  seq_ids) and the teacher scores them; rows carry `policy_version` = the student's step.
  `output_dir` must be shared storage on a multi-node cluster (workers write, tasks read it).

Age of a shard at step s = s − `produced_at_step` of its current version (the initial pass has
produced_at_step −1). Ages are recorded at every step the scheduler sees, *after* that step's
decision; a pass's `commit_step` is the first step whose record sees all of its commits, so
`commit_step − start_step` is its latency in steps (0 for a pass that completes instantly).

Durable state (the store manifest, `state.scheduler`; a restarted actor resumes from it)::

    {"policy", "fraction", "every_steps", "source", "run",
     "passes", "failed_passes", "rows_refreshed", "teacher_tokens", "generated_tokens",
     "last_step",          # newest student step seen
     "last_slot",          # schedule slot of the last decision (decisions are due at last_slot + S)
     "max_age_seen", "restarts",
     "ages":     [[step, max_age, mean_age]],   # thinned to MAX_AGES rows, keeping the maxima
     "pass_log": [{start_step, commit_step, shards (count), rows, tokens, seconds, source, ok, ...}],
     "in_flight": {start_step, slot, shards, reason} | null}

A pass interrupted by the actor's death is resumed by the restarted actor over the shards it had
not committed (its log entry keeps the original start_step, so its latency includes the outage).
"""
from __future__ import annotations

import math
import os
import threading
import time
from dataclasses import dataclass

__all__ = ["RefreshDecision", "RefreshScheduler", "RoundRobin", "Random", "make_policy", "bound_steps",
           "effective_bound",
           "shards_per_decision", "start_scheduler", "scheduler_status", "drain", "stop_scheduler",
           "finish_scheduler", "fit_kwargs", "scheduler_name", "teacher_compute"]

STATE_KEY = "scheduler"
# The state is rewritten with the manifest at every decision: keep it small whatever the run length.
MAX_AGES = 2048        # age records kept (older ones are thinned, keeping the larger max_age)
MAX_PASS_LOG = 500     # pass log entries kept (the counters keep counting)
REORDER_WINDOW = 8     # an on_step this far behind the newest is a late delivery, further is a rewind


# ---------------------------------------------------------------- decisions and policies

@dataclass(frozen=True)
class RefreshDecision:
    """Re-produce `shard_ids` now (student step `step`); `slot` is the schedule slot it fills."""
    shard_ids: tuple[str, ...]
    reason: str
    step: int = 0
    slot: int = 0


def _ceil(x: float) -> int:
    # 1/0.1 is 10.000000000000002 in floats: round off the noise before the ceiling.
    return math.ceil(round(x, 9))


def shards_per_decision(fraction: float, n_shards: int) -> int:
    """ceil(fraction × n_shards), at least 1 and at most n_shards."""
    return max(1, min(n_shards, _ceil(fraction * n_shards))) if n_shards else 0


def bound_steps(fraction: float, every_steps: int) -> int | None:
    """The round-robin age bound without pass latency: ceil(1/fraction) × every_steps."""
    return _ceil(1.0 / fraction) * int(every_steps) if fraction > 0 else None


def effective_bound(fraction: float, every_steps: int, latency_steps: int) -> int | None:
    """The round-robin age bound that holds whatever the pass latency L (in steps):
    ceil(1/fraction) × max(every_steps, L) + L. Decisions are every_steps apart while passes keep
    up (L <= every_steps: the design's bound plus one pass's latency); when a pass takes longer,
    the next decision waits for it, so decisions are L apart and the bound grows with L."""
    if fraction <= 0:
        return None
    return _ceil(1.0 / fraction) * max(int(every_steps), int(latency_steps)) + int(latency_steps)


def _oldest_key(ages: dict, sid: str):
    age = ages[sid]
    return (-math.inf if age is None else -age, sid)  # no current version: the oldest of all


class RoundRobin:
    """Oldest shards first (ties by shard id): every shard within ceil(1/fraction) decisions."""
    name = "round_robin"

    def select(self, ages: dict[str, int | None], k: int, step: int) -> list[str]:
        return sorted(ages, key=lambda sid: _oldest_key(ages, sid))[:k]


class Random:
    """k shards uniformly at random; seeded by (seed, step), so a restarted actor decides the same."""
    name = "random"

    def __init__(self, seed: int = 0):
        self.seed = int(seed)

    def select(self, ages: dict[str, int | None], k: int, step: int) -> list[str]:
        import numpy as np

        ids = sorted(ages)
        rng = np.random.default_rng([self.seed & 0xFFFFFFFF, int(step) & 0xFFFFFFFF])
        return sorted(ids[i] for i in rng.choice(len(ids), size=k, replace=False))


def make_policy(name: str, seed: int = 0):
    if name == "round_robin":
        return RoundRobin()
    if name == "random":
        return Random(seed)
    if name == "none":
        return None
    raise ValueError(f"refresh.policy: unknown policy {name!r} — use round_robin, random or none")


# ---------------------------------------------------------------- the state machine

class _Idle:
    """No pass running: a due decision starts one."""
    name = "idle"

    def on_step(self, s: "RefreshScheduler", step: int):
        decision = s.decide(step, s.ages_at(step))
        if decision is None:
            return self, None
        return s._launch(decision, start_step=step), decision


class _Running:
    """A pass is in flight: due decisions wait for it."""
    name = "running"

    def __init__(self, decision: RefreshDecision, start_step: int):
        self.decision, self.start_step = decision, start_step

    def on_step(self, s, step):
        return self, None


class _Resuming:
    """Restarted with a pass in flight: at the first step, re-issue the shards it had not committed."""
    name = "resuming"

    def __init__(self, in_flight: dict):
        self.in_flight = in_flight

    def on_step(self, s, step):
        f = self.in_flight
        left = tuple(sid for sid in f["shards"]
                     if s.produced.get(sid) is None or s.produced[sid] < f["start_step"])
        if not left:  # everything had landed before the restart: close the pass as done now
            s._close_pass({"rows": 0, "tokens": 0, "seconds": 0.0, "complete": True, "resumed": True},
                          f, commit_step=step)
            return _Idle().on_step(s, step)
        # Shards that went past the bound during the outage ride along: waiting for the next
        # decision would add a whole pass to their age.
        overdue = tuple(sid for sid in s.overdue(s.ages_at(step)) if sid not in left)
        decision = RefreshDecision(left + overdue, f"resume the pass of step {f['start_step']} after a "
                                   f"restart ({len(left)} of {len(f['shards'])} shards left, "
                                   f"{len(overdue)} overdue)", step=step, slot=f["slot"])
        return s._launch(decision, start_step=f["start_step"], original=list(f["shards"]) + list(overdue)), \
            decision


class _Stopped:
    """Drained at the end of training: ages are still recorded, no pass starts."""
    name = "stopped"

    def on_step(self, s, step):
        return self, None


class RefreshScheduler:
    """Decides and runs refresh passes; see the module docstring.

    run_pass(decision, on_commit) -> stats runs one pass synchronously and calls
    on_commit(shard_id, record) for each committed shard (record has produced_at_step); the
    default is a real teacher pass. background=False runs passes inline (tests: instant passes).
    """

    def __init__(self, cfg, store, *, vocab_size: int | None = None, teacher_rev: str | None = None,
                 policy_dir: str | None = None, run_pass=None, background: bool = True,
                 persist_every_s: float = 1.0, metrics=None):
        r = cfg.refresh
        self.cfg, self.store = cfg, store
        self.vocab_size, self.teacher_rev, self.policy_dir = vocab_size, teacher_rev, policy_dir
        self.policy = make_policy(r.policy, r.seed) if r.fraction > 0 else None
        self.fraction, self.every = float(r.fraction), int(r.every_steps)
        self.background, self.persist_every_s = background, float(persist_every_s)
        self._run_pass = run_pass or self._teacher_pass
        self._lock = threading.RLock()
        self._thread: threading.Thread | None = None
        self._last_persist = 0.0
        self._dirty = False
        self._draining = False
        self._warned_slow = False
        if metrics is None:
            from .metrics import RunMetrics
            metrics = RunMetrics(cfg.run.name)
        self.metrics = metrics

        m = store.manifest()
        self.shard_ids = sorted(set(m["inputs"].get("shards") or {}) | set(m["shards"]))
        self.produced: dict[str, int | None] = {}
        for sid in self.shard_ids:
            rec = store._current(m, sid)
            self.produced[sid] = None if rec is None else int(rec["produced_at_step"])
        saved = (m.get("state") or {}).get(STATE_KEY) or {}
        if saved and saved.get("run") != cfg.run.name:
            print(f"raydistill: refresh state in {store.uri} belongs to run {saved.get('run')!r}, "
                  f"not {cfg.run.name!r}: starting afresh", flush=True)
            saved = {}
        self.state = {
            "policy": r.policy, "fraction": self.fraction, "every_steps": self.every, "source": r.source,
            "run": cfg.run.name, "passes": 0, "failed_passes": 0, "rows_refreshed": 0,
            "teacher_tokens": 0, "generated_tokens": 0, "last_step": 0, "last_slot": 0,
            "max_age_seen": None, "restarts": 0, "ages": [], "pass_log": [], "in_flight": None}
        for k in ("passes", "failed_passes", "rows_refreshed", "teacher_tokens", "generated_tokens",
                  "last_step", "last_slot", "max_age_seen", "restarts", "ages", "pass_log", "in_flight"):
            if k in saved:
                self.state[k] = saved[k]
        self.phase = _Idle()
        if saved:
            self.state["restarts"] += 1
            if saved.get("in_flight"):
                self.phase = _Resuming(saved["in_flight"])
            print(f"raydistill: refresh scheduler resumed from {store.uri} (passes {self.state['passes']}, "
                  f"last step {self.state['last_step']}, pass in flight: {bool(saved.get('in_flight'))})",
                  flush=True)
            self._persist(force=True)

    # ------------------------------------------------------------ policy logic (pure)
    def ages_at(self, step: int) -> dict[str, int | None]:
        """{shard_id: age at `step`} (None: the shard has no current version)."""
        return {sid: None if p is None else step - p for sid, p in self.produced.items()}

    def overdue(self, ages: dict[str, int | None]) -> list[str]:
        """Round robin: the shards older than its bound (or without a version), oldest first."""
        bound = bound_steps(self.fraction, self.every)
        if not isinstance(self.policy, RoundRobin) or bound is None:
            return []
        return sorted((sid for sid, a in ages.items() if a is None or a > bound),
                      key=lambda sid: _oldest_key(ages, sid))

    def decide(self, step: int, ages: dict[str, int | None]) -> RefreshDecision | None:
        """A decision if one is due at `step` (every `every_steps` steps), else None."""
        if self.policy is None or not ages:
            return None
        S, last = self.every, int(self.state["last_slot"])
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

    # ------------------------------------------------------------ events
    def on_step(self, step: int) -> RefreshDecision | None:
        """Student step `step` is done (train rank 0, fire and forget)."""
        step = int(step)
        with self._lock:
            last = int(self.state["last_step"])
            if step <= last:
                if step == last or last - step <= REORDER_WINDOW:
                    return None  # duplicate or late delivery (threaded actor, retried call)
                # Training went back (resumed from an older checkpoint, or a new run on this store).
                print(f"raydistill: refresh scheduler saw step {step} after {last}: training rewound",
                      flush=True)
                self.state["last_slot"] = min(int(self.state["last_slot"]), step - step % self.every)
            self.state["last_step"] = step
            self.phase, decision = self.phase.on_step(self, step)
            self._record_ages(step)
            self._persist()  # a decision was persisted when it launched
            return decision

    def _launch(self, decision: RefreshDecision, *, start_step: int, original=None):
        """Record the decision durably, then run its pass (background thread or inline)."""
        self.state["last_slot"] = decision.slot
        self.state["in_flight"] = {"start_step": start_step, "slot": decision.slot,
                                   "shards": list(original or decision.shard_ids), "reason": decision.reason,
                                   "step": decision.step}
        running = _Running(decision, start_step)
        self._persist(force=True)
        print(f"raydistill: refresh pass at step {decision.step}: {decision.reason}", flush=True)
        if self.background:
            self._thread = threading.Thread(target=self._pass_body, args=(decision,), daemon=True,
                                            name=f"refresh-{decision.step}")
            self.phase = running  # set before the thread can finish and set Idle
            self._thread.start()
            return running
        self.phase = running
        self._pass_body(decision)
        return self.phase

    def _on_commit(self, shard_id: str, record: dict) -> None:
        with self._lock:
            self.produced[shard_id] = int(record["produced_at_step"])

    def _pass_body(self, decision: RefreshDecision) -> None:
        start = time.perf_counter()
        try:
            stats, error = self._run_pass(decision, self._on_commit) or {}, None
        except Exception as e:  # a failed pass is logged; its shards stay oldest and are picked next
            stats, error = {}, f"{type(e).__name__}: {e}"
            print(f"raydistill: refresh pass of step {decision.step} failed: {error}", flush=True)
        stats.setdefault("seconds", time.perf_counter() - start)
        with self._lock:
            in_flight = self.state["in_flight"] or {"start_step": decision.step, "shards": list(decision.shard_ids)}
            # Inline passes land before the step's age record; a background pass is first seen
            # by the record of the step after the newest one seen now.
            commit_step = decision.step if not self.background else int(self.state["last_step"]) + 1
            if error:
                stats["error"] = error
            self._close_pass(stats, in_flight, commit_step=commit_step)
            self.phase = _Stopped() if self._draining else _Idle()
        if self.background:
            self._gc()

    def _close_pass(self, stats: dict, in_flight: dict, *, commit_step: int) -> None:
        st = self.state
        ok = not stats.get("error") and stats.get("complete", True)
        entry = {"start_step": int(in_flight["start_step"]), "commit_step": int(commit_step),
                 "shards": len(in_flight["shards"]), "rows": int(stats.get("rows", 0)),
                 "tokens": int(stats.get("tokens", 0)), "seconds": round(float(stats.get("seconds", 0.0)), 3),
                 "source": st["source"], "ok": bool(ok)}
        for k in ("error", "policy_version", "generated_tokens", "teacher_rev", "resumed"):
            if k in stats:
                entry[k] = stats[k]
        st["pass_log"] = (st["pass_log"] + [entry])[-MAX_PASS_LOG:]
        latency = entry["commit_step"] - entry["start_step"]
        if latency > self.every and not self._warned_slow:
            self._warned_slow = True
            print(f"raydistill: WARNING a refresh pass took {latency} steps, more than refresh.every_steps="
                  f"{self.every}: passes run back to back and the age bound becomes "
                  f"{effective_bound(self.fraction, self.every, latency)} steps instead of "
                  f"{bound_steps(self.fraction, self.every)} + {latency} — raise refresh.max_replicas or "
                  f"refresh.every_steps", flush=True)
        st["passes" if ok else "failed_passes"] += 1
        st["rows_refreshed"] += entry["rows"]
        st["teacher_tokens"] += entry["tokens"]
        st["generated_tokens"] += int(stats.get("generated_tokens", 0))
        st["in_flight"] = None
        self.metrics.refresh_pass(entry["rows"])
        self._persist(force=True)

    def _record_ages(self, step: int) -> None:
        known = [step - p for p in self.produced.values() if p is not None]
        if not known:
            return
        mx, mean = max(known), sum(known) / len(known)
        ages = self.state["ages"]  # [step, max_age, mean_age] rows: compact in the manifest's JSON
        ages.append([step, mx, round(mean, 3)])
        if len(ages) > MAX_AGES:  # thin: merge neighbours, keeping the one with the larger max age
            head = ages[:-1]
            ages[:] = [max(head[i:i + 2], key=lambda a: a[1]) for i in range(0, len(head), 2)] + ages[-1:]
        seen = self.state["max_age_seen"]
        self.state["max_age_seen"] = mx if seen is None else max(seen, mx)
        self.metrics.shard_ages(mx, mean)
        self._dirty = True

    def _persist(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and (not self._dirty or now - self._last_persist < self.persist_every_s):
            return
        self.store.update_state(STATE_KEY, self.state)
        self._last_persist, self._dirty = now, False

    def _gc(self) -> None:
        try:
            self.store.gc(keep=max(2, self.cfg.targets.keep_versions))
        except Exception as e:  # housekeeping must not stop refreshes
            print(f"raydistill: store gc after a refresh failed: {e}", flush=True)

    # ------------------------------------------------------------ control and status
    def ping(self) -> bool:
        return True

    def drain(self, timeout: float | None = None) -> bool:
        """Stop deciding; wait up to `timeout` s for a pass in flight. True if none is left."""
        with self._lock:
            self._draining = True
            if not isinstance(self.phase, _Running):
                self.phase = _Stopped()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)
        with self._lock:
            self._persist(force=True)
            done = self.state["in_flight"] is None
        if done:
            self.close_pool()  # hand the replicas' CPUs/GPUs back before evaluation
        return done

    def status(self) -> dict:
        """The figures for the report (see `scheduler_status`)."""
        with self._lock:
            st = self.state
            return {"policy": st["policy"], "fraction": self.fraction, "every_steps": self.every,
                    "source": st["source"], "passes": st["passes"], "failed_passes": st["failed_passes"],
                    "rows_refreshed": st["rows_refreshed"], "teacher_tokens": st["teacher_tokens"],
                    "generated_tokens": st["generated_tokens"], "max_age_seen": st["max_age_seen"],
                    "bound_steps": bound_steps(self.fraction, self.every) if self.policy else None,
                    "max_latency_steps": self._max_latency(),
                    "effective_bound_steps": effective_bound(self.fraction, self.every, self._max_latency())
                    if self.policy else None,
                    "kept_up": self._max_latency() <= self.every,
                    "restarts": st["restarts"], "last_step": st["last_step"], "phase": self.phase.name,
                    "in_flight": st["in_flight"], "shards": len(self.shard_ids),
                    "ages": [{"step": a[0], "max_age": a[1], "mean_age": a[2]} for a in st["ages"]],
                    "pass_log": [dict(p) for p in st["pass_log"]]}

    def _max_latency(self) -> int:
        return max((p["commit_step"] - p["start_step"] for p in self.state["pass_log"]), default=0)

    # ------------------------------------------------------------ the real pass
    def _teacher_pool(self, teacher_rev: str):
        """The long-lived refresh replicas, reloaded only when the teacher revision changes."""
        from .refresh.pool import TeacherPool

        pool = getattr(self, "_pool", None)
        if pool is not None and pool.teacher_rev != teacher_rev:
            pool.close()
            pool = None
        if pool is None:
            size = min(self.cfg.teacher.replicas, self.cfg.refresh.max_replicas)
            pool = self._pool = TeacherPool(self.cfg, self.store, vocab_size=self.vocab_size, size=size,
                                            teacher_rev=teacher_rev)
        return pool

    def close_pool(self) -> None:
        pool, self._pool = getattr(self, "_pool", None), None
        if pool is not None:
            pool.close()

    def _teacher_pass(self, decision: RefreshDecision, on_commit) -> dict:
        from .models import model_revision
        from .teacher import run_teacher_pass

        cfg, r = self.cfg, self.cfg.refresh
        teacher_rev = model_revision(cfg.teacher.model, cfg.teacher.revision)  # a new checkpoint → new rev
        seed = cfg.run.seed
        if r.source == "resample":
            seed = (r.seed * 1_000_003 + decision.step * 7919 + 1) & 0x7FFFFFFF  # a new draw per pass
        inputs, policy_version, extra = None, -1, {}
        if r.source == "on_policy":
            gen = generate_policy_inputs(cfg, self.store, list(decision.shard_ids), self.policy_dir,
                                         step=decision.step, vocab_size=self.vocab_size)
            inputs, policy_version = gen["inputs"], gen["policy_version"]
            extra = {"policy_version": policy_version, "generated_tokens": gen["tokens"]}
        stats = run_teacher_pass(cfg, self.store, list(decision.shard_ids), vocab_size=self.vocab_size,
                                 teacher_rev=teacher_rev, step=decision.step, source=r.source, seed=seed,
                                 inputs=inputs, policy_version=policy_version,
                                 max_replicas=r.max_replicas, metrics=self.metrics, on_commit=on_commit,
                                 pool=self._teacher_pool(teacher_rev))
        if inputs:
            _prune_policy_inputs(self.store, list(inputs))
        return dict(stats, teacher_rev=teacher_rev, **extra)


# ---------------------------------------------------------------- on-policy inputs

def _load_policy(cfg, policy_dir: str | None):
    """(model, step) of the latest student saved by rank 0; the initial student (step 0) if none yet."""
    from .models import build_student, load_causal_lm

    latest = os.path.join(policy_dir, "latest") if policy_dir else None
    for _ in range(10):  # rank 0 swaps `latest` by two renames: retry through that short window
        if not (latest and os.path.isdir(latest)):
            break
        try:
            with open(os.path.join(latest, "step.txt")) as f:
                step = int(f.read())
            model = load_causal_lm(latest, key="policy")
            with open(os.path.join(latest, "step.txt")) as f:
                if int(f.read()) == step:
                    return model, step
        except Exception:  # half-renamed directory, partial write: try again
            pass
        time.sleep(0.2)
    model = build_student(cfg.student, cfg.teacher.model, trust_remote_code=cfg.teacher.trust_remote_code,
                          seed=cfg.run.seed)
    return model.eval(), 0


def _sample_continuations(model, prompts, n_new: int, generator, temperature: float = 1.0):
    """prompts [B, P] → [B, P + n_new], sampling each new token from the model (KV cache)."""
    import torch

    with torch.inference_mode():
        out = model(input_ids=prompts, use_cache=True)
        past, logits = out.past_key_values, out.logits[:, -1].float()
        toks = [prompts]
        for i in range(n_new):
            probs = torch.softmax(logits / temperature, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator)
            toks.append(nxt)
            if i + 1 < n_new:
                out = model(input_ids=nxt, past_key_values=past, use_cache=True)
                past, logits = out.past_key_values, out.logits[:, -1].float()
        return torch.cat(toks, dim=1)


def _generate_task(cfg_dict: dict, store_uri: str, shard_ids: list[str], policy_dir: str | None,
                   step: int, vocab_size: int) -> dict:
    """Ray task: the latest student continues each shard's prompts; writes one inputs file per shard."""
    import torch

    from .config import Config
    from .data import inputs_table
    from .store import SoftTargetStore
    from .teacher import list_column_to_numpy, task_seed

    cfg = Config.from_dict(cfg_dict, check_paths=False)
    torch.set_num_threads(max(1, int(cfg.teacher.cpus_per_replica)))
    device = "cuda" if cfg.teacher.gpus_per_replica > 0 and torch.cuda.is_available() else "cpu"
    store = SoftTargetStore(store_uri)
    model, policy_step = _load_policy(cfg, policy_dir)
    model.to(device)
    out, tokens = {}, 0
    for sid in shard_ids:
        table = store.read_input(sid)
        ids = torch.from_numpy(list_column_to_numpy(table["input_ids"]))
        L = ids.shape[1]
        P = max(1, L // 2)
        gen = torch.Generator(device=device).manual_seed(task_seed(cfg.refresh.seed, sid, step))
        parts = []
        for lo in range(0, len(ids), cfg.teacher.batch_size):
            x = ids[lo:lo + cfg.teacher.batch_size, :P].to(device)
            parts.append(_sample_continuations(model, x, L - P, gen).cpu())
        new = torch.cat(parts).numpy()
        tokens += int((L - P) * len(new))
        rel = f"inputs/policy/{sid}-{int(step)}.parquet"
        store.write_file(rel, inputs_table(table["seq_id"].to_numpy(), new, vocab_size))
        out[sid] = rel
    return {"inputs": out, "policy_version": int(policy_step), "tokens": tokens}


def generate_policy_inputs(cfg, store, shard_ids: list[str], policy_dir: str | None, *, step: int,
                           vocab_size: int) -> dict:
    """On-policy inputs for `shard_ids`, generated in Ray tasks sized like teacher replicas (at most
    `refresh.max_replicas` at once). Returns {"inputs": {sid: rel path}, "policy_version", "tokens"}."""
    import ray

    t = cfg.teacher
    task = ray.remote(_generate_task).options(num_cpus=t.cpus_per_replica, num_gpus=t.gpus_per_replica or None,
                                              resources=dict(t.resources) or None, max_retries=2)
    n = max(1, min(cfg.refresh.max_replicas, len(shard_ids)))
    groups = [shard_ids[i::n] for i in range(n)]
    cfg_dict = cfg.to_dict()
    results = ray.get([task.remote(cfg_dict, store.uri, g, policy_dir, step, vocab_size) for g in groups if g])
    inputs = {k: v for res in results for k, v in res["inputs"].items()}
    return {"inputs": inputs, "policy_version": min(r["policy_version"] for r in results),
            "tokens": sum(r["tokens"] for r in results)}


def _prune_policy_inputs(store, shard_ids: list[str], keep: int = 2) -> None:
    """Delete all but the newest `keep` generated inputs files of each shard (the scored rows are
    in the shard versions; the inputs files are only read while a pass scores them)."""
    import pyarrow.fs as pafs

    try:
        infos = store.filesystem.get_file_info(
            pafs.FileSelector(store.full_path("inputs/policy"), allow_not_found=True))
    except OSError:
        return
    by_shard: dict[str, list[tuple[int, str]]] = {}
    for info in infos:
        name = info.path.rsplit("/", 1)[-1]
        if not name.endswith(".parquet") or "-" not in name:
            continue
        sid, _, rest = name[:-len(".parquet")].rpartition("-")
        if sid in shard_ids and rest.lstrip("-").isdigit():
            by_shard.setdefault(sid, []).append((int(rest), info.path))
    for files in by_shard.values():
        for _, path in sorted(files)[:-keep]:
            try:
                store.filesystem.delete_file(path)
            except OSError:
                pass


# ---------------------------------------------------------------- launch (Ray)

def scheduler_name(cfg) -> str:
    return f"raydistill-refresh-{cfg.run.name}"


def policy_path(cfg) -> str:
    out = cfg.run.output_dir
    out = out if "://" in out else os.path.abspath(os.path.expanduser(out))
    return f"{out.rstrip('/')}/policy"


def fit_kwargs(cfg, name: str, namespace: str | None) -> dict:
    """What `fit_student` needs to tell the scheduler its steps (and save policies for on_policy)."""
    on_policy = cfg.refresh.source == "on_policy"
    return {"scheduler": name, "namespace": namespace, "policy_dir": policy_path(cfg) if on_policy else None,
            "policy_every": cfg.refresh.every_steps if on_policy else 0}


def _check_room(cfg) -> None:
    """Warn when a refresh pass cannot be placed beside the train workers (it would only start
    once training has ended: no deadlock, but no refresh either)."""
    import ray

    t, tr, r = cfg.teacher, cfg.train, cfg.refresh
    total = ray.cluster_resources()
    pool = min(t.replicas, r.max_replicas)  # the refresh replicas live as long as training
    need_cpu = tr.workers * tr.cpus_per_worker + pool * t.cpus_per_replica + 0.5  # + data tasks
    need_gpu = (tr.workers if tr.use_gpu else 0) + pool * t.gpus_per_replica
    short = []
    if total.get("CPU", 0) < need_cpu:
        short.append(f"CPU {need_cpu:g} (cluster {total.get('CPU', 0):g})")
    if need_gpu and total.get("GPU", 0) < need_gpu:
        short.append(f"GPU {need_gpu:g} (cluster {total.get('GPU', 0):g})")
    if short:
        print("raydistill: WARNING refresh passes cannot run beside training: need " + ", ".join(short) +
              " — lower refresh.max_replicas or teacher.cpus_per_replica / gpus_per_replica, or add nodes",
              flush=True)


class _RemoteRefreshScheduler(RefreshScheduler):
    """What runs as the actor: Ray Data there logs one line per pass instead of progress bars."""

    def __init__(self, cfg, store, **kwargs):
        from ray.data import DataContext

        ctx = DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        from . import teacher  # noqa: F401  (torch, transformers: imported now, not in the first pass)
        from .models import model_revision

        super().__init__(cfg, store, **kwargs)
        if self.policy is not None:  # the replicas load the teacher while training starts, not at pass 1
            self._teacher_pool(model_revision(cfg.teacher.model, cfg.teacher.revision))


def start_scheduler(cfg, store, info, name: str, namespace: str | None = None, *,
                    persist_every_s: float = 1.0):
    """The named scheduler actor (created, or the running one of that name): restarts forever,
    re-reading its state from the store manifest. Returns its handle once it is constructed."""
    import ray

    _check_room(cfg)
    actor = ray.remote(_RemoteRefreshScheduler).options(
        name=name, namespace=namespace, get_if_exists=True, max_restarts=-1, max_task_retries=-1,
        max_concurrency=4, num_cpus=0)
    handle = actor.remote(cfg, store, vocab_size=info.vocab_size, teacher_rev=info.teacher_rev,
                          policy_dir=policy_path(cfg), persist_every_s=persist_every_s)
    ray.get(handle.ping.remote())
    return handle


def scheduler_status(handle) -> dict:
    """{policy, fraction, every_steps, source, passes, rows_refreshed, teacher_tokens, max_age_seen,
    bound_steps, ages: [{step, max_age, mean_age}], pass_log: [{start_step, commit_step, shards, rows,
    seconds, ...}], ...} — what the report puts under "refresh" (and "ages")."""
    import ray

    return ray.get(handle.status.remote())


def drain(handle, timeout: float = 600.0) -> bool:
    """After training: no new passes; wait up to `timeout` s for the one in flight. True if done."""
    import ray

    return ray.get(handle.drain.remote(timeout), timeout=timeout + 60)


def stop_scheduler(handle) -> None:
    import ray

    ray.kill(handle, no_restart=True)


def finish_scheduler(handle, timeout: float = 600.0) -> dict:
    """End of training: drain, read the status for the report, stop the actor."""
    done = drain(handle, timeout)
    status = scheduler_status(handle)
    status["drained"] = done
    stop_scheduler(handle)
    return status


def teacher_compute(report_passes: list[dict], status: dict | None, *, online_tokens: int = 0) -> dict:
    """Teacher forward tokens of a run: initial pass(es), refresh passes, and the online baseline's
    forward inside every step."""
    initial = sum(int(p.get("tokens", 0)) for p in report_passes or [])
    refresh = int((status or {}).get("teacher_tokens", 0))
    return {"initial": initial, "refresh": refresh, "online": int(online_tokens),
            "total": initial + refresh + int(online_tokens)}
