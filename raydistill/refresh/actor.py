"""Launching the refresh scheduler: the plain `RefreshScheduler` made a named Ray actor, and the
calls the driver makes around training (start → fit with `fit_kwargs` → finish).

The actor restarts forever (`max_restarts=-1`), re-reading its state from the store manifest; calls
made while it restarts are retried on the new one (`max_task_retries=-1`), so a trainer waiting on
it resumes waiting. It is threaded (`max_concurrency`): a blocking `wait_until_fresh` never holds
up `on_step`, `status` or the pass's own commits.
"""
from __future__ import annotations

import os

from ..log import log
from .client import RefreshSpec
from .on_policy import policy_path
from .policy import bound_steps
from .scheduler import RefreshScheduler


def scheduler_name(cfg) -> str:
    return f"raydistill-refresh-{cfg.run.name}"


def max_age(cfg) -> int | None:
    """The enforced bound: refresh.max_age, default ceil(1/fraction) × every_steps."""
    r = cfg.refresh
    return r.max_age or bound_steps(r.fraction, r.every_steps)


def fit_kwargs(cfg, name: str, namespace: str | None) -> dict:
    """What `fit_student` needs to reach the scheduler: {"refresh": RefreshSpec}. Rank 0 writes the
    ages it saw, one JSON line per step, to `<output_dir>/refresh/ages-<run>.jsonl` (local dirs)."""
    from ..cluster import output_dir

    r, out = cfg.refresh, output_dir(cfg)
    on_policy = r.source == "on_policy"
    audit = None if "://" in out else os.path.join(out, "refresh", f"ages-{cfg.run.name}.jsonl")
    return {"refresh": RefreshSpec(name=name, namespace=namespace,
                                   policy_dir=policy_path(cfg) if on_policy else None,
                                   policy_every=r.every_steps if on_policy else 0,
                                   max_age=max_age(cfg), enforce=r.enforce, audit_path=audit)}


def _check_room(cfg) -> None:
    """Warn when a refresh pass cannot be placed beside the train workers (with enforce=warn it
    would only start once training has ended; with wait, training stops with the pool's error)."""
    import ray

    tr, r = cfg.train, cfg.refresh
    total = ray.cluster_resources()
    # The refresh replicas live as long as training: one pool per teacher (several teachers: each its own).
    pools = [(min(t.replicas, r.max_replicas), t) for t in (cfg.teachers or [cfg.teacher])]
    need_cpu = tr.workers * tr.cpus_per_worker + sum(n * t.cpus_per_replica for n, t in pools) + 0.5  # + data tasks
    need_gpu = (tr.workers if tr.use_gpu else 0) + sum(n * t.gpus_per_replica for n, t in pools)
    short = []
    if total.get("CPU", 0) < need_cpu:
        short.append(f"CPU {need_cpu:g} (cluster {total.get('CPU', 0):g})")
    if need_gpu and total.get("GPU", 0) < need_gpu:
        short.append(f"GPU {need_gpu:g} (cluster {total.get('GPU', 0):g})")
    if short:
        log("refresh passes cannot run beside training: need " + ", ".join(short) +
            " — lower refresh.max_replicas or teacher.cpus_per_replica / gpus_per_replica, or add nodes",
            warning=True)


class _RemoteRefreshScheduler(RefreshScheduler):
    """What runs as the actor: Ray Data there logs one line per pass instead of progress bars."""

    def __init__(self, cfg, store, **kwargs):
        from ray.data import DataContext

        ctx = DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        from .. import teacher  # noqa: F401  (torch, transformers: imported now, not in the first pass)
        from ..models import model_revision

        super().__init__(cfg, store, **kwargs)
        if self.policy is not None:  # the replicas load the teacher while training starts, not at pass 1
            if cfg.teachers:  # several teachers: a pool each
                from ..teachers import revisions

                for name, rev in revisions(cfg).items():
                    self._teacher_pool(rev, name)
            else:
                self._teacher_pool(model_revision(cfg.teacher.model, cfg.teacher.revision))


def start_scheduler(cfg, store, info, name: str, namespace: str | None = None, *,
                    persist_every_s: float = 1.0):
    """The named scheduler actor (created, or the running one of that name): restarts forever,
    re-reading its state from the store manifest. Returns its handle once it is constructed."""
    import ray

    from ..faults import teacher_fault

    _check_room(cfg)
    actor = ray.remote(_RemoteRefreshScheduler).options(
        name=name, namespace=namespace, get_if_exists=True, max_restarts=-1, max_task_retries=-1,
        max_concurrency=8, num_cpus=0)
    handle = actor.remote(cfg, store, vocab_size=info.vocab_size, teacher_rev=info.teacher_rev,
                          policy_dir=policy_path(cfg), persist_every_s=persist_every_s,
                          teacher_fault=teacher_fault())
    ray.get(handle.ping.remote())
    return handle


def scheduler_status(handle) -> dict:
    """{policy, fraction, every_steps, source, enforce, passes, failed_passes, rows_refreshed,
    teacher_tokens, max_age_seen, bound_steps, max_age, effective_bound_steps, kept_up, bound_held,
    stall_seconds, stall_steps, stall_share, unseen_steps, pool_replicas, ages: [{step, max_age,
    mean_age}], pass_log: [{start_step, commit_step, shards, rows, seconds, stall_s, ...}], ...} —
    what the report puts under "refresh" (and "ages")."""
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
