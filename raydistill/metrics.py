"""Dashboard metrics of a run through `ray.util.metrics`.

Every metric is named `raydistill_<what>` and tagged with `run` (the run name); Ray exports it on
each node's metrics port with its own `ray_` prefix (e.g. `ray_raydistill_train_loss`), where the
dashboard's Prometheus scrapes it.

| method                       | metric(s)                                              | kind    | tags        |
|------------------------------|--------------------------------------------------------|---------|-------------|
| `teacher_rows(n, source)`    | `raydistill_teacher_rows`                              | Counter | run, source |
| `teacher_tokens(n, source)`  | `raydistill_teacher_tokens`                            | Counter | run, source |
| `refresh_pass(rows)`         | `raydistill_refresh_passes`, `raydistill_rows_refreshed` | Counter | run       |
| `refresh_stall(seconds)`     | `raydistill_refresh_stall_seconds`                     | Counter | run         |
| `shard_ages(max, mean)`      | `raydistill_max_shard_age`, `raydistill_mean_shard_age` | Gauge  | run         |
| `train_step(loss, tps, step)`| `raydistill_train_loss`, `raydistill_train_tokens_per_s`, `raydistill_train_step` | Gauge | run |

Metric objects are created lazily, once per process (Ray wants one object per name and process),
and shared by every `RunMetrics` of that process. When Ray is not initialised (unit tests, plain
scripts) every method is a silent no-op — this module does not even import Ray then. Metrics are
best effort: a failure to record is logged once and never breaks a teacher pass or a training step.
"""
from __future__ import annotations

import logging
import sys
import threading

__all__ = ["RunMetrics", "METRICS", "registered"]

log = logging.getLogger(__name__)

# name -> (kind, tag keys, description)
METRICS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "raydistill_teacher_rows": ("counter", ("run", "source"), "Rows scored by teacher passes."),
    "raydistill_teacher_tokens": ("counter", ("run", "source"), "Tokens scored by teacher passes."),
    "raydistill_refresh_passes": ("counter", ("run",), "Refresh teacher passes completed."),
    "raydistill_rows_refreshed": ("counter", ("run",), "Rows re-scored by refresh passes."),
    "raydistill_refresh_stall_seconds": ("counter", ("run",),
                                         "Seconds training waited for refresh passes (the staleness bound)."),
    "raydistill_max_shard_age": ("gauge", ("run",), "Max soft-target shard age in student steps."),
    "raydistill_mean_shard_age": ("gauge", ("run",), "Mean soft-target shard age in student steps."),
    "raydistill_train_loss": ("gauge", ("run",), "Student training loss (last step)."),
    "raydistill_train_tokens_per_s": ("gauge", ("run",), "Student training throughput, tokens/s."),
    "raydistill_train_step": ("gauge", ("run",), "Student global step."),
}

_lock = threading.Lock()
_objects: dict[str, object] = {}   # name -> ray.util.metrics object, this process only
_warned: set[str] = set()


def _ray_ready() -> bool:
    # If Ray was never imported here it cannot be initialised: don't pay for importing it.
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def _metric(name: str):
    obj = _objects.get(name)
    if obj is None:
        with _lock:
            obj = _objects.get(name)
            if obj is None:
                from ray.util import metrics as rm

                kind, tag_keys, desc = METRICS[name]
                cls = rm.Counter if kind == "counter" else rm.Gauge
                obj = _objects[name] = cls(name, description=desc, tag_keys=tag_keys)
    return obj


def registered() -> dict[str, object]:
    """The metric objects this process has created so far (name -> ray.util.metrics object)."""
    return dict(_objects)


class RunMetrics:
    """Records the figures of run `run_name`; cheap to build and to pickle into actors/workers."""

    def __init__(self, run_name: str):
        self.run_name = str(run_name)

    def _record(self, name: str, value, **tags) -> None:
        if not _ray_ready():
            return
        try:
            value = float(value)
            metric = _metric(name)
            tags = {"run": self.run_name, **{k: str(v) for k, v in tags.items()}}
            if METRICS[name][0] == "counter":
                if value > 0:  # Counter.inc refuses 0 and negatives
                    metric.inc(value, tags=tags)
            else:
                metric.set(value, tags=tags)
        except Exception as e:  # observability must never break the run
            if name not in _warned:
                _warned.add(name)
                log.warning("raydistill metric %s not recorded: %r", name, e)

    def teacher_rows(self, n: int, source: str) -> None:
        self._record("raydistill_teacher_rows", n, source=source)

    def teacher_tokens(self, n: int, source: str) -> None:
        self._record("raydistill_teacher_tokens", n, source=source)

    def refresh_pass(self, rows: int) -> None:
        self._record("raydistill_refresh_passes", 1)
        self._record("raydistill_rows_refreshed", rows)

    def refresh_stall(self, seconds: float) -> None:
        self._record("raydistill_refresh_stall_seconds", seconds)

    def shard_ages(self, max_age: float, mean_age: float) -> None:
        self._record("raydistill_max_shard_age", max_age)
        self._record("raydistill_mean_shard_age", mean_age)

    def train_step(self, loss: float, tokens_per_s: float, step: int) -> None:
        self._record("raydistill_train_loss", loss)
        self._record("raydistill_train_tokens_per_s", tokens_per_s)
        self._record("raydistill_train_step", step)

    def __repr__(self) -> str:
        return f"RunMetrics({self.run_name!r})"
