"""Fault-injection hooks for tests: real process deaths at chosen points, driven by env vars.

Three places can be made to die, each under the env var names the tests set:

    store    RAYDISTILL_FAULT=<point>                 the committing process exits (code 86) at
                                                      <point> of a commit (read where it commits)
    train    RAYDISTILL_KILL_AT_STEP=N, _RANK=r,      worker rank r exits once, after step N
             RAYDISTILL_KILL_MARKER=path
    teacher  RAYDISTILL_TEACHER_KILL_AT_SHARD=N,      a replica exits once at its N-th shard,
             _MARKER=path, _WHEN=before_write|after_write (default after_write);
             RAYDISTILL_TEACHER_DELAY_S=s             every shard takes s seconds longer

The train and teacher hooks are read on the driver (`train_fault()`, `teacher_fault()`) and
travel to workers / actors as plain dicts, so a test's env vars reach processes Ray started
before the test set them. A marker file, created atomically, makes a kill happen once per marker
across replicas, restarts and worker groups. Nothing here runs unless those variables are set.
"""
from __future__ import annotations

import os
import time


def store_crash(point: str) -> None:
    """Die abruptly (no cleanup, no flush) when RAYDISTILL_FAULT == point."""
    if os.environ.get("RAYDISTILL_FAULT") == point:
        os._exit(86)


def train_fault() -> dict | None:
    """Driver side: the train kill hook from the env, or None."""
    at, marker = os.environ.get("RAYDISTILL_KILL_AT_STEP"), os.environ.get("RAYDISTILL_KILL_MARKER")
    if not (at and marker):
        return None
    return {"step": int(at), "rank": int(os.environ.get("RAYDISTILL_KILL_RANK", "0")), "marker": marker}


def teacher_fault() -> dict | None:
    """Driver side: the teacher replica kill / delay hook from the env, or None."""
    env = os.environ
    fault: dict = {}
    if env.get("RAYDISTILL_TEACHER_KILL_AT_SHARD") and env.get("RAYDISTILL_TEACHER_KILL_MARKER"):
        fault.update(at=int(env["RAYDISTILL_TEACHER_KILL_AT_SHARD"]), marker=env["RAYDISTILL_TEACHER_KILL_MARKER"],
                     when=env.get("RAYDISTILL_TEACHER_KILL_WHEN", "after_write"))
    if env.get("RAYDISTILL_TEACHER_DELAY_S"):
        fault["delay_s"] = float(env["RAYDISTILL_TEACHER_DELAY_S"])
    return fault or None


def at_train_step(fault: dict | None, step: int, rank: int) -> None:
    """Worker side: this worker process dies once, right after optimizer step `step`."""
    if fault and step == fault["step"] and rank == fault["rank"] and _claim(fault["marker"]):
        # Let the controller register the last report first, as it would in any run whose
        # checkpoints are minutes apart (it polls workers every few seconds).
        time.sleep(fault.get("delay_s", 5.0))
        os._exit(1)


def at_teacher_shard(fault: dict | None, point: str, scored: int) -> None:
    """Replica side, at `point` of its `scored`-th shard: slow down, and/or die once."""
    if not fault:
        return
    if point == "before_write" and fault.get("delay_s"):
        time.sleep(fault["delay_s"])
    if fault.get("marker") and point == fault.get("when", "after_write") and scored == fault.get("at") \
            and _claim(fault["marker"]):
        os._exit(1)


def _claim(marker: str) -> bool:
    """Create `marker` exclusively (holding this pid); False if someone already did."""
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    return True
