"""The refresh pool: long-lived teacher replicas that score refresh passes.

Unlike the Ray Data pool of an initial pass (started and torn down per pass), these replicas
live as long as the scheduler, so the teacher is loaded once per revision, not once per pass.
"""
from __future__ import annotations

from ..store import SoftTargetStore
from ..teacher import TeacherReplica, _replica_kwargs, target_params


class TeacherPool:
    """Long-lived teacher replicas (plain Ray actors placed like `teacher.*`) for refresh passes.

    A Ray Data pool loads the teacher again for every pass — minutes for a large model — so
    refresh passes would lag training by that much. This pool loads it once per teacher revision;
    `score` hands each replica one shard at a time and yields results as they land. A replica that
    dies is restarted by Ray and its shard retried (`max_task_retries`); its resources stay
    reserved beside training for the whole run (what `refresh.max_replicas` caps)."""

    def __init__(self, cfg, store: SoftTargetStore, *, vocab_size: int, size: int, teacher_rev: str):
        import ray

        t = cfg.teacher
        self.size, self.teacher_rev = max(1, int(size)), teacher_rev
        kwargs = _replica_kwargs(cfg, target_params(cfg.targets), vocab_size, store)
        actor = ray.remote(TeacherReplica).options(
            num_cpus=t.cpus_per_replica, num_gpus=t.gpus_per_replica or 0, resources=dict(t.resources) or None,
            max_restarts=-1, max_task_retries=3)
        self.actors = [actor.remote(**kwargs) for _ in range(self.size)]

    def score(self, tasks: list[dict]):
        import ray

        queue, idle, running = list(tasks), list(self.actors), {}
        while queue or running:
            while queue and idle:
                replica, task = idle.pop(), queue.pop(0)
                ref = replica.score_shard.remote(task["shard_id"], task["version"], task["inputs"],
                                                 task["seed"], task["policy_version"])
                running[ref] = replica
            done, _ = ray.wait(list(running), num_returns=1)
            idle.append(running.pop(done[0]))
            yield ray.get(done[0])

    def close(self) -> None:
        import ray

        for replica in self.actors:
            ray.kill(replica)
        self.actors = []
