"""The trainer's side of refresh: train rank 0 tells the scheduler its steps and, with
`refresh.enforce: wait`, waits before a step that would break the staleness bound.

The trainer holds one `RefreshClient` (None when the run has no refresh) and calls, on rank 0:

    client.before_step(step)        # before the backward of the micro-batch that completes `step`:
                                    # the other ranks then hold in the gradient all-reduce
    client.after_step(step, model)  # after the optimizer step (fire and forget)

The wait is cheap: the scheduler answers with the oldest shard's produced_at_step, so the client
knows every step up to that + max_age is safe and asks again only past it. The ages it records
(`seen`, and one JSON line per step in `spec.audit_path`) are upper bounds of the store's true
ages at that step. A wait polls in slices of WAIT_SLICE_S, so a scheduler actor that dies and
restarts mid-wait is asked again (Ray retries the call on the restarted actor) and never deadlocks.
"""
from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass

WAIT_SLICE_S = 5.0       # one blocking call to the scheduler lasts at most this
LOG_WAIT_EVERY_S = 30.0  # a long wait says so this often
ACTOR_GONE_S = 300.0     # a scheduler missing this long (not restarting) stops the wait with an error


@dataclass(frozen=True)
class RefreshSpec:
    """What the trainer needs to reach the scheduler actor (picklable, crosses to workers)."""
    name: str
    namespace: str | None = None
    policy_dir: str | None = None   # on_policy: where rank 0 saves the current student
    policy_every: int = 0
    max_age: int | None = None      # the bound in student steps (None: nothing to enforce)
    enforce: str = "wait"           # wait | warn
    audit_path: str | None = None   # rank 0 appends {"step", "age", "stall_s"} per step here


class RefreshClient:
    def __init__(self, spec: RefreshSpec):
        self.spec = spec
        self._actor = None
        self._min_produced: int | None = None   # every shard was produced at this step or later
        self._warned = False
        self.seen: list[tuple[int, int | None, float]] = []   # (step, max age upper bound, stall s)
        self.stall_seconds = 0.0
        # One id per fit attempt: the scheduler tells this client's late calls from a resumed run's rewind.
        self.client_id = uuid.uuid4().hex[:12]

    def _handle(self):
        """One GCS lookup per worker, not per step. The handle outlives actor restarts; calls
        made while it restarts are queued and retried."""
        import ray

        if self._actor is None:
            try:
                self._actor = ray.get_actor(self.spec.name, namespace=self.spec.namespace)
            except ValueError:
                return None
        return self._actor

    def before_step(self, step: int) -> None:
        """Rank 0, before step `step` runs (see the module docstring)."""
        max_age, stall = self.spec.max_age, 0.0
        if max_age is None:
            return
        if self._min_produced is None or step - self._min_produced > max_age:
            stall = self._ask(step, block=self.spec.enforce == "wait")
        age = None if self._min_produced is None else step - self._min_produced
        if age is not None and age > max_age and not self._warned:
            self._warned = True
            from ..log import log0
            log0(f"[refresh] WARNING step {step} trains on a shard aged {age} > refresh.max_age {max_age} "
                 f"(refresh.enforce={self.spec.enforce})")
        self._record(step, age, stall)

    def _ask(self, step: int, *, block: bool) -> float:
        """Ask the scheduler (blocking in slices while `block`); returns the seconds waited."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        from ..log import log0

        start = last_log = time.monotonic()
        gone_since = None
        while True:
            actor = self._handle()
            if actor is None:  # not (yet) registered again after a crash: give it a while
                gone_since = gone_since or time.monotonic()
                if time.monotonic() - gone_since > ACTOR_GONE_S:
                    raise RuntimeError(f"refresh: scheduler actor {self.spec.name!r} (namespace "
                                       f"{self.spec.namespace!r}) is gone; training cannot keep refresh.max_age "
                                       f"{self.spec.max_age} — restart the run, or set refresh.enforce=warn")
                time.sleep(1.0)
                continue
            gone_since = None
            try:
                res = ray.get(actor.wait_until_fresh.remote(step, WAIT_SLICE_S, block),
                              timeout=WAIT_SLICE_S + 60)
            except GetTimeoutError:
                continue
            except RayActorError:   # killed for good (or restarting): look it up again
                self._actor = None
                time.sleep(1.0)
                continue
            if res.get("error") and block:
                raise RuntimeError(res["error"])
            if res.get("min_produced") is not None:
                self._min_produced = int(res["min_produced"])
            if res.get("fresh") or not block:
                break
            if time.monotonic() - last_log > LOG_WAIT_EVERY_S:
                last_log = time.monotonic()
                log0(f"[refresh] step {step}: waiting {last_log - start:.0f} s for shards older than "
                     f"max_age {self.spec.max_age} to be refreshed")
        waited = time.monotonic() - start if block else 0.0
        if waited > 0.05:
            self.stall_seconds += waited
            log0(f"[refresh] step {step} waited {waited:.1f} s for the staleness bound (max_age "
                 f"{self.spec.max_age}; {self.stall_seconds:.1f} s in all)")
        return waited

    def _record(self, step: int, age: int | None, stall: float) -> None:
        self.seen.append((step, age, round(stall, 3)))
        path = self.spec.audit_path
        if path:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "a") as f:
                f.write(json.dumps({"step": step, "age": age, "stall_s": round(stall, 3)}) + "\n")

    def after_step(self, step: int, model) -> None:
        """Rank 0: student step `step` is done (fire and forget: training never waits here)."""
        actor = self._handle()
        if actor is None:
            return
        every = self.spec.policy_every or 0
        if self.spec.policy_dir and every and step % every == 0:
            save_policy(model, self.spec.policy_dir, step)
        actor.on_step.remote(step, self.spec.enforce == "wait" and self.spec.max_age is not None, self.client_id)


def save_policy(model, policy_dir: str, step: int) -> None:
    """The current student for on-policy refresh: written aside, then renamed into place."""
    model = getattr(model, "module", model)   # DDP wraps the model
    tmp = os.path.join(policy_dir, f".tmp-{step}")
    model.save_pretrained(tmp)
    with open(os.path.join(tmp, "step.txt"), "w") as f:
        f.write(str(step))
    final = os.path.join(policy_dir, "latest")
    old = os.path.join(policy_dir, f".old-{step}")
    if os.path.exists(final):
        os.rename(final, old)
    os.rename(tmp, final)
    if os.path.exists(old):
        shutil.rmtree(old, ignore_errors=True)
