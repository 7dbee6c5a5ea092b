"""Not enough cluster resources: `cluster.check_resources` (called right after Ray starts, before any
teacher or train work) refuses with a RaydistillError naming what is missing and what the nodes
offer, within a bounded time — instead of a pass or a TorchTrainer waiting forever to be placed.

The session cluster is one node with 8 logical CPUs and no GPU.
"""
from __future__ import annotations

import time

import pytest

from raydistill.cluster import check_resources
from raydistill.config import load_config
from raydistill.errors import RaydistillError

pytestmark = pytest.mark.slow

BOUND_S = 60


def cfg(tmp_path, tiny_dir, *extra):
    return load_config(None, [f"teacher.model={tiny_dir / 'gpt2-teacher'}", "student.init_from_teacher={n_layer: 1}",
                              "teacher.cpus_per_replica=0.5", "train.workers=2", "train.cpus_per_worker=0.5",
                              f"run.output_dir={tmp_path / 'out'}", *extra])


CASES = {
    "teacher GPU on a CPU cluster": (["teacher.gpus_per_replica=1"],
                                     ["teacher replica (teacher.*)", "GPU=1", "CPU=8"]),
    "train GPUs on a CPU cluster": (["train.use_gpu=true"], ["2 train worker(s) (train.*)", "GPU=1"]),
    "64 train workers": (["train.workers=64", "train.cpus_per_worker=1"],
                         ["64 train worker(s)", "need 64 × {CPU=1}", "CPU=8"]),
    "a replica bigger than any node": (["teacher.cpus_per_replica=12"], ["teacher replica", "CPU=12"]),
    "custom teacher resource absent": (["teacher.resources={teacher_node: 1}"],
                                       ["teacher replica", "teacher_node=1"]),
    "custom train resource absent": (["train.resources={student_node: 1}"],
                                     ["train worker", "student_node=1"]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_missing_resources_refused_quickly(ray_session, tmp_path, tiny_dir, name):
    extra, fragments = CASES[name]
    start = time.monotonic()
    with pytest.raises(RaydistillError) as ei:
        check_resources(cfg(tmp_path, tiny_dir, *extra), timeout_s=0)
    elapsed = time.monotonic() - start
    msg = str(ei.value)
    assert elapsed < 10, elapsed
    assert msg.startswith("not enough cluster resources")
    assert all(f in msg for f in fragments), msg
    assert "lower teacher.replicas / train.workers" in msg and "add nodes" in msg


def test_waits_for_autoscaling_then_refuses_within_bound(ray_session, tmp_path, tiny_dir):
    """With a wait (RAYDISTILL_RESOURCE_WAIT_S: an autoscaler may add nodes) it still ends in bounded time."""
    start = time.monotonic()
    with pytest.raises(RaydistillError, match="GPU=1"):
        check_resources(cfg(tmp_path, tiny_dir, "teacher.gpus_per_replica=1"), timeout_s=3)
    assert 3 <= time.monotonic() - start < BOUND_S


def test_env_wait_is_used(ray_session, tmp_path, tiny_dir, monkeypatch):
    monkeypatch.setenv("RAYDISTILL_RESOURCE_WAIT_S", "2")
    start = time.monotonic()
    with pytest.raises(RaydistillError, match="student_node"):
        check_resources(cfg(tmp_path, tiny_dir, "train.resources={student_node: 1}"))
    assert 2 <= time.monotonic() - start < BOUND_S


def test_fitting_config_passes_at_once(ray_session, tmp_path, tiny_dir):
    start = time.monotonic()
    check_resources(cfg(tmp_path, tiny_dir, "teacher.replicas=2"), timeout_s=30)
    check_resources(cfg(tmp_path, tiny_dir, "train.workers=8", "train.cpus_per_worker=1"), timeout_s=30)
    assert time.monotonic() - start < 5


def test_online_mode_still_needs_a_teacher_slot(ray_session, tmp_path, tiny_dir):
    """train.online runs the teacher in the train step, but evaluation runs in a task placed like a
    teacher replica: an unplaceable teacher is refused up front, not at the end of training."""
    with pytest.raises(RaydistillError, match=r"teacher replica .*GPU=1"):
        check_resources(cfg(tmp_path, tiny_dir, "train.online=true", "teacher.gpus_per_replica=1"), timeout_s=0)


def test_ray_data_outwaits_a_node_launch(ray_session, tmp_path, tiny_dir):
    """A pass that lost a node waits for the autoscaler's replacement: init_ray raises Ray Data's
    no-progress timeout (default 1800 s) above run.resource_wait_s, so Ray Data does not give up first."""
    from ray.data import DataContext

    from raydistill.cluster import init_ray

    ctx = DataContext.get_current()
    before = ctx.execution_no_progress_timeout_s
    try:
        init_ray(cfg(tmp_path, tiny_dir, "run.resource_wait_s=3600"))  # already connected: only the context
        assert ctx.execution_no_progress_timeout_s == 3900
        init_ray(cfg(tmp_path, tiny_dir, "run.resource_wait_s=60"))    # never lowered below what it was
        assert ctx.execution_no_progress_timeout_s == 3900
    finally:
        ctx.execution_no_progress_timeout_s = before
