"""Autoscaling clusters: a submitted job waits for the nodes the autoscaler brings up, and a run no
node type can ever hold is refused in seconds. The jobs are what users run (`ray job submit` of
jobs/distill.py with this repository as the working dir, to a real head on loopback): the finished
one is checked end to end, its outputs, its entrypoint and its Prometheus metrics from every node.

Unit tests (no Ray): the placement arithmetic of `raydistill.cluster` against `cluster.yaml`'s node
types and `configs/llama3-8b-to-1b.yaml`, and how the head's autoscaling config is found.

Cluster tests (slow): Ray's fake multi-node autoscaler on loopback (`RAY_FAKE_CLUSTER=1 ray start --head
--autoscaling-config=...`, provider `fake_multinode`): a head with 2 CPUs and no custom resources,
and two worker node types that start at 0 nodes — `teacher_node_type` {CPU 1, teacher_node 1} and
`student_node_type` {CPU 2, student_node 2} — as `cluster.yaml` declares its GPU types. The jobs
ask `teacher.resources: {teacher_node: 1}` and `train.resources: {student_node: 1}` like
`configs/llama3-8b-to-1b.yaml`. The fake nodes are raylets the head's monitor starts on this
machine; they inherit the head's environment, so the marker sweep of `private_ray_env` finds
them. Only this head's processes are ever stopped (by pid), never `ray stop`.
"""
from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import time
import uuid

import pytest
import yaml

from raydistill.cluster import HEAD_RESOURCE, _ever_fits, _monitor_config_path, _never, _read_autoscaling_config, needs
from raydistill.config import Config
from test_job import (BIN, ROOT, MetricsScraper, check_outputs, load_json, metrics_targets, private_ray_env,
                      ray_head, submit_distill, tail, tiny_assets, wait_job, write_config)

IDLE_TIMEOUT_MIN = 0.5  # short, so the test sees idle teacher nodes removed
WAIT_S = 600            # run.resource_wait_s of the jobs: far above a fake node's launch (~5-30 s)

FAKE_AUTOSCALER = {
    "cluster_name": "rdtest", "max_workers": 2, "upscaling_speed": 1.0,
    "idle_timeout_minutes": IDLE_TIMEOUT_MIN,
    "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                 "disable_launch_config_check": True},
    "auth": {"ssh_user": "ubuntu"},
    "head_node_type": "ray.head.default",
    "available_node_types": {
        "ray.head.default": {"resources": {"CPU": 2}, "node_config": {}, "max_workers": 0},
        "teacher_node_type": {"resources": {"CPU": 1, "teacher_node": 1}, "node_config": {},
                              "min_workers": 0, "max_workers": 1},
        "student_node_type": {"resources": {"CPU": 2, "student_node": 2}, "node_config": {},
                              "min_workers": 0, "max_workers": 1},
    },
    "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
    "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [], "setup_commands": [],
    "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
    "worker_start_ray_commands": [],
}


# ------------------------------------------------------------------ unit: node types and needs

HEAD_UP = [{"CPU": 8.0, "memory": 3.2e10, HEAD_RESOURCE: 1.0}]  # cluster.yaml's head, alive, nothing else


def llama_cfg(*overrides: tuple[str, str, object]):
    with open(os.path.join(ROOT, "configs", "llama3-8b-to-1b.yaml")) as f:
        d = yaml.safe_load(f)
    for section, key, value in overrides:
        d[section][key] = value
    return Config.from_dict(d, check_paths=False)


def cluster_yaml():
    return _read_autoscaling_config(os.path.join(ROOT, "cluster.yaml"), {})


def test_cluster_yaml_node_types_hold_the_documented_run():
    scaler = cluster_yaml()
    types = {t.name: t for t in scaler.types}
    assert set(types) == {"teacher_gpu", "student_gpu"} and scaler.max_workers == 5  # head type left out
    assert types["teacher_gpu"].resources == {"CPU": 8, "GPU": 1, "teacher_node": 1}
    assert types["teacher_gpu"].max_workers == 4 and types["student_gpu"].max_workers == 1
    roles = needs(llama_cfg())
    # 4 teacher replicas, one per teacher_gpu node; 4 DDP workers on the one student_gpu node.
    assert roles["teacher"].count == 4 and _ever_fits(roles["teacher"], HEAD_UP, scaler) == 4
    assert roles["train"].count == 4 and _ever_fits(roles["train"], HEAD_UP, scaler) == 4
    assert all(_never(roles[r], HEAD_UP, scaler) is None for r in ("teacher", "eval", "train"))


def test_resource_no_node_type_offers_is_named_with_the_types():
    need = needs(llama_cfg(("teacher", "resources", {"tpu_node": 1})))["eval"]
    msg = _never(need, HEAD_UP, cluster_yaml())
    assert msg.startswith("teacher replica (teacher.*) need 1 × {CPU=4, GPU=1, tpu_node=1}: "
                          "no node type offers tpu_node=1"), msg
    assert "teacher_gpu {CPU=8, GPU=1, teacher_node=1} × ≤4" in msg and "student_gpu {" in msg, msg
    # GPU=2 exists (student_gpu has 4) but never beside teacher_node: each type's shortfall is named.
    need = needs(llama_cfg(("teacher", "gpus_per_replica", 2.0)))["eval"]
    msg = _never(need, HEAD_UP, cluster_yaml())
    assert "no node type holds one (short: teacher_gpu GPU=1; student_gpu teacher_node=0)" in msg, msg


def test_more_workers_than_the_types_can_hold_says_how_many_fit():
    need = needs(llama_cfg(("train", "workers", 8)))["train"]
    assert _ever_fits(need, HEAD_UP, cluster_yaml()) == 4
    msg = _never(need, HEAD_UP, cluster_yaml())
    assert "8 train worker(s) (train.*) need 8 × {CPU=8, GPU=1, student_node=1}: at most 4 fit" in msg, msg


def test_global_max_workers_caps_what_may_launch(tmp_path):
    config = {"max_workers": 2, "head_node_type": "h",
              "available_node_types": {"h": {"resources": {}, "max_workers": 0},
                                       "t": {"resources": {"CPU": 1, "teacher_node": 1}, "max_workers": 4}}}
    path = tmp_path / "as.yaml"
    path.write_text(yaml.safe_dump(config))
    scaler = _read_autoscaling_config(str(path), {})
    need = needs(llama_cfg(("teacher", "cpus_per_replica", 1.0), ("teacher", "gpus_per_replica", 0.0)))["teacher"]
    assert _ever_fits(need, [{"CPU": 2.0, HEAD_RESOURCE: 1.0}], scaler) == 2  # 4 allowed by type, 2 in all


def test_autoscaling_config_read_from_the_monitor_command_line():
    """The path comes from the head's monitor process (`--autoscaling-config=`, `~` expanded)."""
    def fake_monitor(*args):
        return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",
                                 "/x/ray/autoscaler/_private/monitor.py", *args])

    with_config, without = fake_monitor("--gcs-address=127.0.0.1:1", "--autoscaling-config=~/boot.yaml"), fake_monitor()
    try:
        deadline = time.monotonic() + 30
        while _monitor_config_path(with_config.pid) is None and time.monotonic() < deadline:
            time.sleep(0.1)  # /proc/<pid>/cmdline fills in once the child has exec'ed
        assert _monitor_config_path(with_config.pid) == os.path.expanduser("~/boot.yaml")
        while _monitor_config_path(without.pid) is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _monitor_config_path(without.pid) == ""   # a monitor with no config: a fixed cluster
    finally:
        for p in (with_config, without):
            p.kill()
            p.wait()
    assert _monitor_config_path(os.getpid()) is None      # not a monitor
    assert _monitor_config_path(None) is None


# ------------------------------------------------------------------ a fake autoscaling cluster

@pytest.fixture(scope="module")
def fake_cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("autoscaling")
    teacher, corpus = tiny_assets(root)
    with private_ray_env("rdas-") as (env, marker, temp), \
            ray_head(env, marker, temp, str(root), num_cpus=2, autoscaling=FAKE_AUTOSCALER,
                     attempts=10) as head:  # a loaded machine misses Ray's fixed 30 s raylet start more often
        yield {"head": head, "env": env, "root": root, "teacher": teacher, "corpus": corpus}
    assert head["leftover"] == [], head["leftover"]


def ray_status(cluster) -> str:
    r = subprocess.run([os.path.join(BIN, "ray"), "status", "--address", cluster["head"]["gcs"]],
                       env=cluster["env"], capture_output=True, text=True, timeout=120)
    return r.stdout + r.stderr


def active_nodes(status: str) -> dict[str, int]:
    """{node type: count} from the Active section of `ray status`."""
    section = status.split("Active:", 1)[-1].split("Pending:", 1)[0]
    return {m.group(2): int(m.group(1)) for m in re.finditer(r"^\s*(\d+)\s+(\S+)\s*$", section, re.M)}


def job_config(cluster, name: str, **teacher_extra) -> str:
    root = cluster["root"]
    path = write_config(root / f"{name}.yaml", name=name, teacher=cluster["teacher"], corpus=cluster["corpus"],
                        output_dir=root / name, max_steps=6, checkpoint_every=3,
                        resources={"student_node": 1})
    with open(path) as f:
        cfg = yaml.safe_load(f)
    cfg["run"]["resource_wait_s"] = WAIT_S
    cfg["teacher"]["resources"] = teacher_extra.get("resources", {"teacher_node": 1})
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return path


@pytest.mark.slow
@pytest.mark.timeout(2400)  # includes the module's head start: up to 10 tries on a loaded machine (13 min seen)
def test_resource_no_node_type_has_is_refused_in_seconds(fake_cluster):
    from ray.job_submission import JobStatus, JobSubmissionClient

    name = f"never-{uuid.uuid4().hex[:8]}"
    sub_id = f"raydistill-{name}"
    submit_distill(fake_cluster["head"], fake_cluster["env"], sub_id,
                   job_config(fake_cluster, name, resources={"tpu_node": 1}))
    status, logs = wait_job(fake_cluster["head"], sub_id, timeout=420)
    assert status == JobStatus.FAILED, logs[-4000:]
    msg = logs[logs.index("not enough cluster resources"):] if "not enough cluster resources" in logs else logs
    assert "teacher replica (teacher.*) need 1 × {CPU=0.5, tpu_node=1}" in msg, logs[-4000:]
    assert "no node type offers tpu_node=1" in msg, msg
    assert "teacher_node_type {CPU=1, teacher_node=1} × ≤1" in msg and "student_node_type" in msg, msg
    assert "(run.resource_wait_s) for" not in logs  # refused, not waited for
    info = JobSubmissionClient(fake_cluster["head"]["dashboard"]).get_job_info(sub_id)
    driver_s = (info.end_time - info.start_time) / 1000
    # Driver start, config and model checks, ray.init, then the refusal: no node launch, no wait.
    assert driver_s < 120, driver_s
    assert "tpu_node" not in ray_status(fake_cluster)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_job_waits_for_autoscaled_nodes_and_they_go_when_idle(fake_cluster):
    from ray.job_submission import JobStatus, JobSubmissionClient

    head = fake_cluster["head"]
    assert active_nodes(ray_status(fake_cluster)).keys() <= {"ray.head.default"}  # no worker node yet
    name = f"autoscale-{uuid.uuid4().hex[:8]}"
    sub_id = f"raydistill-{name}"
    config = job_config(fake_cluster, name)
    # Prometheus, as a user's would: every node the head lists, the autoscaled ones included.
    scraper = MetricsScraper(lambda: metrics_targets(head["temp"]))
    scraper.start()
    try:
        submit_distill(head, fake_cluster["env"], sub_id, config)
        seen: list[dict[str, int]] = []
        status, logs = wait_job(head, sub_id, timeout=1200,
                                every=lambda _: seen.append(active_nodes(ray_status(fake_cluster))))
        if status != JobStatus.SUCCEEDED:
            pytest.fail(f"job {sub_id} ended {status}:\n{logs[-8000:]}\n--- head:\n{tail(head['log'])}")
        # Metrics recorded by the job's driver (teacher rows, on the head) and by the rank-0 train
        # worker (loss, step, on a student node) reach Prometheus, tagged with the run's name.
        deadline = time.monotonic() + 45
        while time.monotonic() < deadline and not (
                scraper.find("ray_raydistill_teacher_rows", run=name)
                and scraper.find("ray_raydistill_train_step", run=name)
                and scraper.find("ray_raydistill_train_loss", run=name)):
            time.sleep(1)
    finally:
        scraper.stop.set()
        scraper.join(timeout=10)
    info = JobSubmissionClient(head["dashboard"]).get_job_info(sub_id)
    assert info.entrypoint.endswith(f"jobs/distill.py --config {config}")
    assert f"raydistill: run {name!r} finished" in logs

    # The log shows each phase's wait for the nodes the autoscaler was launching.
    assert f"waiting up to {WAIT_S} s (run.resource_wait_s) for 1 × {{CPU=0.5, teacher_node=1}}" in logs, logs[-6000:]
    assert f"waiting up to {WAIT_S} s (run.resource_wait_s) for 2 × {{CPU=0.5, student_node=1}}" in logs, logs[-6000:]
    assert re.search(r"1 × \{CPU=0\.5, teacher_node=1\} up after \d+ s", logs), logs[-6000:]
    assert re.search(r"2 × \{CPU=0\.5, student_node=1\} up after \d+ s", logs), logs[-6000:]
    # `ray status` during the job showed the launched nodes of both types.
    assert any(s.get("teacher_node_type") == 1 for s in seen), seen
    assert any(s.get("student_node_type") == 1 for s in seen), seen

    out = fake_cluster["root"] / name
    report = load_json(out / "report.json")
    assert report["run"]["name"] == name and report["run"]["output_dir"] == str(out)
    manifest = check_outputs(str(out), report, steps=6)
    train_rows = report["inputs"]["train_rows"]
    assert all(e["current"] == 1 for e in manifest["shards"].values())
    assert report["teacher_passes"][0]["rows"] == train_rows

    assert scraper.scrapes > 0, f"no node's metrics endpoint answered ({metrics_targets(head['temp'])})"
    assert scraper.find("ray_raydistill_teacher_rows", run=name, source="initial") == [float(train_rows)], \
        scraper.samples
    assert scraper.find("ray_raydistill_teacher_tokens", run=name, source="initial") == [float(train_rows * 16)]
    assert max(scraper.find("ray_raydistill_train_step", run=name)) == 6, scraper.samples
    loss = scraper.find("ray_raydistill_train_loss", run=name)
    assert loss and all(math.isfinite(v) and v > 0 for v in loss)
    assert scraper.find("ray_raydistill_train_tokens_per_s", run=name)

    # Nothing holds the nodes after the job (no standing request_resources): idle, they are removed.
    deadline = time.monotonic() + IDLE_TIMEOUT_MIN * 60 + 180
    while True:
        now = active_nodes(ray_status(fake_cluster))
        if "teacher_node_type" not in now and "student_node_type" not in now:
            break
        assert time.monotonic() < deadline, f"worker nodes still up after the idle timeout: {now}"
        time.sleep(3)
