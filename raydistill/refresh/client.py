"""The trainer's side of refresh: train rank 0 tells the scheduler its steps (and, with
`refresh.enforce: wait`, waits before a step that would break the staleness bound).

The trainer holds one `RefreshClient` (None when the run has no refresh) and calls, on rank 0:

    client.before_step(step)        # before the backward of the micro-batch that completes `step`:
                                    # the other ranks then hold in the gradient all-reduce
    client.after_step(step, model)  # after the optimizer step (fire and forget)
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass


@dataclass(frozen=True)
class RefreshSpec:
    """What the trainer needs to reach the scheduler actor (picklable, crosses to workers)."""
    name: str
    namespace: str | None = None
    policy_dir: str | None = None   # on_policy: where rank 0 saves the current student
    policy_every: int = 0


class RefreshClient:
    def __init__(self, spec: RefreshSpec):
        self.spec = spec
        self._actor = None

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

    def after_step(self, step: int, model) -> None:
        """Rank 0: student step `step` is done (fire and forget: training never waits here)."""
        actor = self._handle()
        if actor is None:
            return
        every = self.spec.policy_every or 0
        if self.spec.policy_dir and every and step % every == 0:
            save_policy(model, self.spec.policy_dir, step)
        actor.on_step.remote(step)


def save_policy(model, policy_dir: str, step: int) -> None:
    """The current student for on-policy refresh: written aside, then renamed into place."""
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
