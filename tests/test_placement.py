"""Placement on heterogeneous clusters: teacher replicas and train workers pinned to node types.

A two-node cluster (`ray.cluster_utils.Cluster` on loopback: a head offering `teacher_node`, a node
offering `student_node`) runs in a separate process (tests/placement_scenario.py): the pytest process
may already hold a `ray.init()` of the session fixture, and a Cluster in this process would clash
with it. The scenario reports, from the state API, the node of every teacher actor
(`MapWorker(MapBatches(TeacherReplica))`) and train worker (`RayTrainWorker`).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from placement_scenario import RAY_START_FAILED
from test_job import RAY_START_ATTEMPTS, describe, kill_marked, private_ray_env, tail, tiny_assets, wait_gone

pytestmark = pytest.mark.slow

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "placement_scenario.py")


@pytest.mark.timeout(1800)  # a two-node Ray, a teacher pass and a DDP fit on 2 busy cores
def test_teacher_and_workers_pinned_to_node_types(tmp_path):
    teacher, corpus = tiny_assets(tmp_path)
    result_path, log_path = tmp_path / "placement.json", tmp_path / "placement.log"
    with private_ray_env() as (env, marker, temp):
        for attempt in range(1, RAY_START_ATTEMPTS + 1):
            with open(log_path, "w") as log:
                proc = subprocess.Popen([sys.executable, SCRIPT, "--teacher", str(teacher), "--corpus",
                                         str(corpus), "--out", str(tmp_path / "out"), "--result", str(result_path)],
                                        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
                try:
                    rc = proc.wait(timeout=840)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                    pytest.fail(f"placement scenario timed out:\n{tail(log_path)}")
            if rc != RAY_START_FAILED:
                break
            kill_marked(marker)  # a Ray that failed to start on this busy machine: start again
        assert rc == 0, tail(log_path)
        # Cluster.shutdown() removed its nodes: nothing of the scenario outlives it.
        leftover = describe(wait_gone(marker, 30))
        assert leftover == [], leftover

    res = json.loads(result_path.read_text())
    nodes = res["nodes"]
    assert len(set(nodes.values())) == 2 and set(res["node_resources"]) == set(nodes.values())
    assert res["node_resources"][nodes["teacher"]].get("teacher_node") == 2
    assert "student_node" not in res["node_resources"][nodes["teacher"]]
    assert res["node_resources"][nodes["student"]].get("student_node") == 2
    assert "teacher_node" not in res["node_resources"][nodes["student"]]

    p = res["teacher_pass"]
    assert p["complete"] and p["shards"] == p["expected_shards"] > 1 and p["rows"] > 0

    # Every teacher actor asked for the teacher node's resource, and every one that got a process
    # (some may be killed mid-construction when the pool winds down) ran there.
    teachers = res["teacher_actors"]
    assert teachers, res
    assert all(a["class_name"] == "MapWorker(MapBatches(TeacherReplica))" for a in teachers), teachers
    assert all(a["required_resources"].get("teacher_node") == 1 for a in teachers), teachers
    placed = [a["node_id"] or a["process_node_id"] for a in teachers if a["pid"]]
    assert placed and set(placed) == {nodes["teacher"]}, (teachers, nodes)
    assert all(a["node_id"] in (None, nodes["teacher"]) for a in teachers), teachers

    assert res["train_error"] is None and res["train_steps"] == res["total_steps"] == 2
    workers = res["train_workers"]
    assert len(workers) == 2, workers                       # train.workers, none restarted
    assert {a["node_id"] for a in workers} == {nodes["student"]}, (workers, nodes)
    assert all(a["process_node_id"] in (None, nodes["student"]) for a in workers), workers
