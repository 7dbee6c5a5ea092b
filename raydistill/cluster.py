"""The cluster a run works on: where its outputs go, how teacher-shaped work is placed, joining or
starting Ray, and whether the run's replicas and workers can be placed (now, or once an
autoscaler has launched the nodes it may).
"""
from __future__ import annotations

import os


def output_dir(cfg) -> str:
    """`run.output_dir` as every process must see it: absolute for a local path (workers and
    tasks do not share the driver's working directory), untouched for a URI (s3://, gs://)."""
    d = cfg.run.output_dir
    return d if "://" in d else os.path.abspath(os.path.expanduser(d))


def teacher_options(teacher_cfg) -> dict:
    """Ray placement of anything sized like one teacher replica (pool actors, eval and generation
    tasks): {num_cpus, num_gpus, resources}, for `.options(**...)` or Ray Data's map_batches."""
    t = teacher_cfg
    return {"num_cpus": t.cpus_per_replica, "num_gpus": t.gpus_per_replica or 0,
            "resources": dict(t.resources) or None}
