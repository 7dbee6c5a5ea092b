"""One log helper for the whole package: `log(...)` on drivers and actors, `log0(...)` in train workers.

Lines go through the `raydistill` logger to the process's own stdout as `raydistill: <message>`,
so a submitted job's log, the Ray dashboard and a laptop run all read the same. In Ray Train
workers only rank 0 logs (`log0`), and it writes to `sys.__stdout__`: Ray Train's print patch
would otherwise tee each line twice.
"""
from __future__ import annotations

import logging
import sys

_logger = logging.getLogger("raydistill")


class _StdoutHandler(logging.StreamHandler):
    """Resolves the stream at emit time: `sys.stdout` as it is then (a driver's, or a test's capture),
    or, for a train worker's rank-0 line, `sys.__stdout__` (Ray Train swaps sys.stdout for a tee)."""

    def __init__(self):
        super().__init__(sys.stdout)

    def emit(self, record):
        # Assigned, not setStream(): that flushes the previous stream, which may be a closed capture.
        self.stream = sys.__stdout__ if getattr(record, "worker", False) else sys.stdout
        super().emit(record)
        self.flush()


if not _logger.handlers:
    _handler = _StdoutHandler()
    _handler.setFormatter(logging.Formatter("raydistill: %(message)s"))
    _logger.addHandler(_handler)
    _logger.setLevel(logging.INFO)
    _logger.propagate = False


def log(msg: str, *, warning: bool = False, _worker: bool = False) -> None:
    """One line of the run's log (`WARNING` prefixed when `warning`)."""
    _logger.log(logging.WARNING if warning else logging.INFO, ("WARNING " if warning else "") + msg,
                extra={"worker": _worker})


def log0(msg: str, *, warning: bool = False) -> None:
    """`log` on train rank 0 only (elsewhere: the driver, an actor) — one line per event, not per worker."""
    worker = False
    try:
        import ray.train

        if ray.train.get_context().get_world_rank() != 0:
            return
        worker = True
    except Exception:  # not inside a Ray Train worker
        pass
    log(msg, warning=warning, _worker=worker)
