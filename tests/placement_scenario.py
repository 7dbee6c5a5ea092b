"""Helper of test_placement.py, run in its own process: a two-node-type cluster on loopback.

    python tests/placement_scenario.py --teacher DIR --corpus FILE --out DIR --result FILE.json

Builds a `ray.cluster_utils.Cluster` (a head offering `teacher_node` + a node offering
`student_node`), runs a teacher pass and a short DDP fit pinned with `teacher.resources` /
`train.resources`, and writes where every teacher actor and train worker ran (from the state API,
`list_actors(detail=True)`) to FILE.json. It runs apart from pytest so that it never meets a Ray
the test session may already have started; the test gives it a private RAY_TMPDIR so the
`ray_current_cluster` file Cluster writes is seen by no one else's `ray.init()`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


RAY_START_FAILED = 75  # exit code: Ray itself failed to start, nothing ran; the test may retry


from ports import free_ports, node_ports  # noqa: E402


def actors_where(cls_fragment: str) -> list[dict]:
    """Actors of that class, alive or dead, with the node each one's process ran on.

    An actor killed while its constructor still runs (an autoscaling pool winding down before a
    second replica finished loading the teacher) is listed with node_id None but with the pid of
    its process: its node comes from the worker table then."""
    from ray.util.state import list_actors, list_workers

    workers = {w.pid: w.node_id for w in list_workers(detail=True, limit=10000, raise_on_missing_output=False)}
    out = []
    for a in list_actors(detail=True, limit=10000, raise_on_missing_output=False):
        if cls_fragment not in (a.class_name or ""):
            continue
        death = ((a.death_cause or {}).get("actor_died_error_context") or {})
        out.append({"class_name": a.class_name, "node_id": a.node_id, "state": a.state, "pid": a.pid,
                    "process_node_id": workers.get(a.pid) if a.pid else None,
                    "required_resources": a.required_resources, "never_started": death.get("never_started"),
                    "death_reason": death.get("reason")})
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--result", required=True)
    args = ap.parse_args()

    import ray
    from ray.cluster_utils import Cluster

    from raydistill.cluster import check_resources
    from raydistill.config import load_config
    from raydistill.data import build_inputs
    from raydistill.models import preflight
    from raydistill.pipeline import open_store, score_pending
    from raydistill.train import fit_student, read_final_state

    cfg = load_config(None, [
        f"teacher.model={args.teacher}", "student.init_from_teacher={n_layer: 1}",
        f"data.path={args.corpus}", "data.seq_len=16", "data.eval_fraction=0.1",
        "targets.format=sampled", "targets.samples=20", "targets.shard_rows=40",
        "teacher.replicas=2", "teacher.cpus_per_replica=0.5", "teacher.batch_size=16",
        "teacher.resources={teacher_node: 1}",
        "train.workers=2", "train.cpus_per_worker=0.5", "train.resources={student_node: 1}",
        "train.batch_size=16", "train.max_steps=2", "train.checkpoint_every=2", "train.log_every=1",
        f"run.output_dir={args.out}", f"run.name=placement-{os.getpid()}"])
    info = preflight(cfg)

    # Two nodes, as on a real heterogeneous cluster: the head offers `teacher_node` (and hosts the
    # driver), a second node offers `student_node`.
    dash, = free_ports(1)
    cluster = None
    try:
        cluster = Cluster(initialize_head=True, head_node_args=dict(
            num_cpus=2, resources={"teacher_node": 2}, include_dashboard=True, dashboard_host="127.0.0.1",
            dashboard_port=dash, object_store_memory=150 * 1024 * 1024, **node_ports()))
        teacher_node = cluster.head_node
        student_node = cluster.add_node(num_cpus=2, resources={"student_node": 2}, **node_ports())
        cluster.wait_for_nodes()
    except Exception as e:
        # Ray gives a raylet 30 s to register; on a loaded machine that can fail. Nothing of the
        # scenario ran yet: tell the test to sweep our processes and start again.
        if "timed out during startup" in str(e):
            print(f"placement scenario: Ray did not start: {e}", flush=True)
            if cluster is not None:
                cluster.shutdown()
            return RAY_START_FAILED
        raise
    result: dict = {}
    try:
        ray.init(address=cluster.address, log_to_driver=False,
                 runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}})
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False
        result["nodes"] = {"teacher": teacher_node.node_id, "student": student_node.node_id}
        result["node_resources"] = {n["NodeID"]: {k: v for k, v in n["Resources"].items()
                                                  if not k.startswith("node:")}
                                    for n in ray.nodes() if n["Alive"]}
        check_resources(cfg)

        store = open_store(cfg, info)
        build_inputs(cfg, store, info)
        stats = score_pending(cfg, store, info)
        result["teacher_pass"] = {k: stats[k] for k in ("shards", "rows", "expected_shards", "complete")}
        result["teacher_actors"] = actors_where("TeacherReplica")

        fit, total = fit_student(cfg, store, info.vocab_size)
        result["train_error"] = None if fit.error is None else repr(fit.error)
        result["train_steps"] = read_final_state(fit)["step"] if fit.error is None else None
        result["total_steps"] = total
        result["train_workers"] = actors_where("RayTrainWorker")
    finally:
        with open(args.result, "w") as f:
            json.dump(result, f, indent=1)
        ray.shutdown()
        cluster.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
