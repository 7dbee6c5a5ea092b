"""Refresh policies: which shards a pass re-produces, returned as `RefreshDecision` objects.

Pure functions of the shards' ages (no Ray, no store): the state machine asks, a policy answers.

- `RoundRobin`: the oldest first (ties by shard id). Every shard is then re-produced at least once
  every ceil(1/fraction) decisions, so no shard is older than `bound_steps = ceil(1/fraction) ×
  every_steps` plus one pass's latency L (in steps) while passes keep up (L <= every_steps); when a
  pass is slower, decisions are L apart and an unenforced bound becomes `effective_bound`.
- `Random(seed)`: uniform, no bound; it exists to show the age tail that round robin removes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

Ages = dict  # {shard_id: age in student steps, or None when the shard has no current version}


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
    """The round-robin age bound that holds whatever the pass latency L (in steps), when nothing
    waits for it and no pass fails: ceil(1/fraction) × max(every_steps, L) + L. Decisions are
    every_steps apart while passes keep up (L <= every_steps: the design's bound plus one pass's
    latency); when a pass takes longer, the next decision waits for it, so decisions are L apart."""
    if fraction <= 0:
        return None
    return _ceil(1.0 / fraction) * max(int(every_steps), int(latency_steps)) + int(latency_steps)


def oldest_key(ages: Ages, sid: str):
    """Sort key: oldest first, a shard with no current version oldest of all, ties by id."""
    age = ages[sid]
    return (-math.inf if age is None else -age, sid)


def older_than(ages: Ages, limit: int) -> list[str]:
    """The shards older than `limit` steps (or without a version), oldest first."""
    return sorted((sid for sid, a in ages.items() if a is None or a > limit), key=lambda s: oldest_key(ages, s))


class RoundRobin:
    """Oldest shards first (ties by shard id): every shard within ceil(1/fraction) decisions."""
    name = "round_robin"
    bounded = True

    def select(self, ages: Ages, k: int, step: int) -> list[str]:
        return sorted(ages, key=lambda sid: oldest_key(ages, sid))[:k]


class Random:
    """k shards uniformly at random; seeded by (seed, step), so a restarted actor decides the same."""
    name = "random"
    bounded = False

    def __init__(self, seed: int = 0):
        self.seed = int(seed)

    def select(self, ages: Ages, k: int, step: int) -> list[str]:
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
