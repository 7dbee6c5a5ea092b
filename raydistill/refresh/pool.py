"""The refresh pool: long-lived teacher replicas that score refresh passes.

Unlike the Ray Data pool of an initial pass (started and torn down per pass), these replicas
live as long as the scheduler, so the teacher is loaded once per revision, not once per pass.
The pool can grow while it runs (`grow`): a new replica takes shards once it is placed and
loaded, so a replica still waiting for a node (an autoscaler launching one) never holds a pass up.
"""
from __future__ import annotations

import time

from ..store import SoftTargetStore
from ..teacher import TeacherReplica, _replica_kwargs, target_params


class PoolPlacementError(RuntimeError):
    """No replica of the refresh pool could be placed in time (the cluster lacks what one needs)."""


class TeacherPool:
    """Long-lived teacher replicas (plain Ray actors placed like `teacher.*`) for refresh passes.

    A Ray Data pool loads the teacher again for every pass — minutes for a large model — so
    refresh passes would lag training by that much. This pool loads it once per teacher revision;
    `score` hands each ready replica one shard at a time and yields results as they land. A replica
    that dies is restarted by Ray and its shard retried (`max_task_retries`); its resources stay
    reserved beside training for the whole run (what `refresh.max_replicas` caps)."""

    def __init__(self, cfg, store: SoftTargetStore, *, vocab_size: int, size: int, teacher_rev: str,
                 place_timeout_s: float = 1800.0, fault: dict | None = None):
        import ray

        from ..cluster import teacher_options

        self.teacher_rev, self.place_timeout_s = teacher_rev, float(place_timeout_s)
        self._options = teacher_options(cfg.teacher)
        self._kwargs = _replica_kwargs(cfg, target_params(cfg.targets), vocab_size, store)
        if fault is not None:  # test hooks read on the driver (this may run in the scheduler actor)
            self._kwargs["fault"] = fault
        self._actor = ray.remote(TeacherReplica).options(**self._options, max_restarts=-1, max_task_retries=3)
        self.actors, self._ready = [], {}   # _ready: actor index -> its __ray_ready__ ref, until it answers
        self.grow(max(1, int(size)))

    @property
    def size(self) -> int:
        return len(self.actors)

    def grow(self, n: int = 1) -> None:
        """Start `n` more replicas; each joins the passes once placed and loaded."""
        for _ in range(n):
            actor = self._actor.remote(**self._kwargs)
            self._ready[len(self.actors)] = actor.__ray_ready__.remote()
            self.actors.append(actor)

    def _usable(self, block: bool) -> list:
        """The replicas that have answered; with `block`, wait (up to place_timeout_s) for one."""
        import ray

        deadline = time.monotonic() + self.place_timeout_s
        while True:
            if self._ready:
                done, _ = ray.wait(list(self._ready.values()), num_returns=len(self._ready), timeout=0)
                for i in [i for i, ref in self._ready.items() if ref in done]:
                    ray.get(self._ready.pop(i))   # a replica that failed to load raises here
            usable = [a for i, a in enumerate(self.actors) if i not in self._ready]
            if usable or not block:
                return usable
            if time.monotonic() > deadline:
                # Short, the numbers last: Ray Train shows a worker error's head and tail only.
                have = {k: v for k, v in ray.cluster_resources().items()
                        if not k.startswith(("node:", "memory", "object_store")) and "_group" not in k}
                raise PoolPlacementError(
                    f"refresh pool: no teacher replica was placed within {self.place_timeout_s:g} s — lower "
                    f"teacher.cpus_per_replica / gpus_per_replica / resources or refresh.max_replicas, add "
                    f"nodes, or raise run.resource_wait_s; each replica needs {self._options}, the cluster "
                    f"has {have}")
            time.sleep(0.5)

    def score(self, tasks: list[dict]):
        import ray

        idle = self._usable(block=True)
        queue, running, joined = list(tasks), {}, set(map(id, idle))
        while queue or running:
            for actor in self._usable(block=False):     # a grown replica joins once it is ready
                if id(actor) not in joined:
                    joined.add(id(actor))
                    idle.append(actor)
            while queue and idle:
                replica, task = idle.pop(), queue.pop(0)
                ref = replica.score_shard.remote(task["shard_id"], task["version"], task["inputs"],
                                                 task["seed"], task["policy_version"])
                running[ref] = replica
            done, _ = ray.wait(list(running), num_returns=1, timeout=1.0)
            if done:
                idle.append(running.pop(done[0]))
                yield ray.get(done[0])

    def close(self) -> None:
        import ray

        for replica in self.actors:
            ray.kill(replica)
        self.actors, self._ready = [], {}
