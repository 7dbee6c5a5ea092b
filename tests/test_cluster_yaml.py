"""cluster.yaml: valid for the Ray autoscaler, pinned to the installed Ray, no public control ports."""
from __future__ import annotations

import ipaddress
import json
import os
import re

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONTROL_PORTS = (8265, 6379, 10001, 52365)  # dashboard / jobs, GCS, Ray client, dashboard agent


@pytest.fixture(scope="module")
def cluster():
    with open(os.path.join(ROOT, "cluster.yaml"), encoding="utf-8") as f:
        return yaml.safe_load(f)


def test_matches_the_autoscaler_schema(cluster):
    jsonschema = pytest.importorskip("jsonschema")
    import ray.autoscaler  # the schema file only; Ray is not started

    with open(os.path.join(os.path.dirname(ray.autoscaler.__file__), "ray-schema.json")) as f:
        jsonschema.validate(cluster, json.load(f))


def test_image_pinned_to_installed_ray(cluster):
    import ray  # version only; Ray is not started

    assert cluster["docker"]["image"] == f"rayproject/ray:{ray.__version__}-py311-gpu"
    assert cluster["docker"]["container_name"] and cluster["docker"]["pull_before_run"] is True


def test_node_types(cluster):
    types = cluster["available_node_types"]
    assert cluster["head_node_type"] in types
    head = types[cluster["head_node_type"]]
    assert "GPU" not in head["resources"] and not set(head["resources"]) & {"teacher_node", "student_node"}
    workers = {name: t for name, t in types.items() if name != cluster["head_node_type"]}
    assert workers
    for name, t in workers.items():
        assert 0 <= t["min_workers"] <= t["max_workers"] <= cluster["max_workers"], name
        assert t["node_config"]["InstanceType"], name
    assert cluster["provider"]["type"] == "aws" and cluster["provider"]["region"]
    assert "cache_stopped_nodes" in cluster["provider"] and cluster["auth"]["ssh_user"]


def test_custom_resources_match_the_llama_config(cluster):
    from raydistill.config import load_config

    declared = {r: name for name, t in cluster["available_node_types"].items()
                for r in t.get("resources", {}) if r.endswith("_node")}
    assert set(declared) == {"teacher_node", "student_node"}
    cfg = load_config(os.path.join(ROOT, "configs", "llama3-8b-to-1b.yaml"))
    assert set(cfg.teacher.resources) | set(cfg.train.resources) == set(declared)
    types = cluster["available_node_types"]
    teacher = types[declared["teacher_node"]]
    student = types[declared["student_node"]]
    # the node types can host what the config asks for
    assert teacher["resources"]["GPU"] >= cfg.teacher.gpus_per_replica
    assert teacher["max_workers"] * teacher["resources"]["teacher_node"] >= cfg.teacher.replicas
    assert student["max_workers"] * student["resources"]["student_node"] >= cfg.train.workers
    assert student["max_workers"] * student["resources"]["GPU"] >= cfg.train.workers


def test_ray_start_commands(cluster):
    head = " ".join(cluster["head_start_ray_commands"])
    assert "--head" in head and "--port=6379" in head
    assert "--dashboard-host=127.0.0.1" in head
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head
    assert "0.0.0.0" not in head
    assert "--address=$RAY_HEAD_IP:6379" in " ".join(cluster["worker_start_ray_commands"])


def _opens(rule, port):
    lo, hi, proto = rule.get("FromPort"), rule.get("ToPort"), str(rule.get("IpProtocol", "")).lower()
    return proto == "-1" or lo in (None, -1) or lo <= port <= (hi if hi not in (None, -1) else 65535)


def test_no_public_control_ports(cluster):
    rules = cluster["provider"].get("security_group", {}).get("IpPermissions", [])
    assert rules, "state the ingress rules explicitly"
    for rule in rules:
        cidrs = [r["CidrIp"] for r in rule.get("IpRanges", [])] + \
                [r["CidrIpv6"] for r in rule.get("Ipv6Ranges", [])]
        for cidr in cidrs:
            if ipaddress.ip_network(cidr).prefixlen == 0:
                assert not any(_opens(rule, p) for p in CONTROL_PORTS), rule
        # the only public ingress is SSH
        assert (rule["FromPort"], rule["ToPort"]) == (22, 22), rule
        assert all(ipaddress.ip_network(c).prefixlen > 0 for c in cidrs), "SSH from an admin CIDR only"


def test_setup_installs_the_project(cluster):
    mounts = cluster["file_mounts"]
    remote = next(r for r, local in mounts.items() if local in (".", "./"))
    assert any(re.search(rf"pip install .*-e {re.escape(remote)}\b", c) for c in cluster["setup_commands"])


def test_every_key_commented():
    with open(os.path.join(ROOT, "cluster.yaml"), encoding="utf-8") as f:
        lines = f.read().splitlines()
    assert lines[0].startswith("#") and any("ray up cluster.yaml" in ln for ln in lines[:10])
    for ln in lines:
        if ln.strip() and not ln.lstrip().startswith("#") and not ln.lstrip().startswith("- "):
            assert "#" in ln, f"uncommented key in cluster.yaml: {ln!r}"
