"""Refresh: the scheduler that keeps every cached soft target within a staleness bound.

    policy.py     which shards a pass re-produces (decision objects; pure)
    scheduler.py  the state machine (plain class, typed state, phases as data)
    status.py     the figures a report states (kept_up, bounds, stalls) and teacher compute
    pool.py       the long-lived teacher replicas that score refresh passes
    passes.py     what one pass produces (refresh.source)
    on_policy.py  student-generated inputs for source=on_policy
    actor.py      the named Ray actor: start / drain / finish, and what fit_student needs
    client.py     train rank 0's side: step events and the wait that enforces the bound
"""
from .actor import (drain, finish_scheduler, fit_kwargs, max_age, scheduler_name, scheduler_status,
                    start_scheduler, stop_scheduler)
from .client import RefreshClient, RefreshSpec, save_policy
from .policy import RefreshDecision, bound_steps, effective_bound, shards_per_decision
from .scheduler import RefreshScheduler
from .status import teacher_compute

__all__ = ["RefreshClient", "RefreshDecision", "RefreshScheduler", "RefreshSpec", "bound_steps", "drain",
           "effective_bound", "finish_scheduler", "fit_kwargs", "max_age", "save_policy", "scheduler_name",
           "scheduler_status", "shards_per_decision", "start_scheduler", "stop_scheduler", "teacher_compute"]
