"""metrics: ray.util.metrics objects with raydistill_ names, run tags; no-op without Ray."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import numpy as np

from raydistill import metrics
from raydistill.metrics import METRICS, RunMetrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROM_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")


def test_metric_names_are_valid_prometheus_names():
    assert len(METRICS) == 10   # 9 + raydistill_refresh_stall_seconds
    for name, (kind, tag_keys, desc) in METRICS.items():
        assert name.startswith("raydistill_") and PROM_NAME.match(name) and ":" not in name
        assert kind in ("counter", "gauge") and tag_keys[0] == "run" and desc


def test_records_under_ray(ray_session):
    from ray.util.metrics import Counter, Gauge

    m = RunMetrics("test-metrics-run")
    m.teacher_rows(128, "initial")
    m.teacher_tokens(128 * 63, "initial")
    m.teacher_rows(0, "refresh")           # a zero increment is skipped, not an error
    m.refresh_pass(32)
    m.refresh_stall(1.5)
    m.shard_ages(max_age=12, mean_age=np.float32(5.5))
    m.train_step(loss=np.float64(3.25), tokens_per_s=1234.5, step=7)
    m.train_step(loss=float("nan"), tokens_per_s=0.0, step=8)

    objs = metrics.registered()
    assert set(objs) == set(METRICS)
    expected = {
        "raydistill_teacher_rows": (Counter, ("run", "source")),
        "raydistill_teacher_tokens": (Counter, ("run", "source")),
        "raydistill_refresh_passes": (Counter, ("run",)),
        "raydistill_rows_refreshed": (Counter, ("run",)),
        "raydistill_refresh_stall_seconds": (Counter, ("run",)),
        "raydistill_max_shard_age": (Gauge, ("run",)),
        "raydistill_mean_shard_age": (Gauge, ("run",)),
        "raydistill_train_loss": (Gauge, ("run",)),
        "raydistill_train_tokens_per_s": (Gauge, ("run",)),
        "raydistill_train_step": (Gauge, ("run",)),
    }
    for name, (cls, tags) in expected.items():
        obj = objs[name]
        assert isinstance(obj, cls), name
        assert obj.info["name"] == name and obj.info["tag_keys"] == tags
        assert not obj._discard_metric, f"{name} would be dropped by Ray as an invalid name"

    # Created once per process: a second RunMetrics reuses the same objects.
    RunMetrics("other-run").train_step(1.0, 2.0, 3)
    assert all(metrics.registered()[k] is v for k, v in objs.items())
    assert not metrics._warned, "a metric failed to record"


def test_noop_without_ray():
    code = textwrap.dedent("""
        import sys
        import raydistill
        ray_before = "ray" in sys.modules      # only metrics' own imports are under test
        from raydistill import metrics
        m = metrics.RunMetrics("no-ray")
        m.teacher_rows(5, "initial"); m.teacher_tokens(50, "initial"); m.refresh_pass(3)
        m.shard_ages(4, 2.0); m.train_step(1.5, 100.0, 1)
        assert metrics.registered() == {}
        assert ray_before or "ray" not in sys.modules, "metrics imported ray without a cluster"
        import ray
        assert not ray.is_initialized()
        m.train_step(1.5, 100.0, 2)          # ray imported but not initialised: still a no-op
        assert metrics.registered() == {} and not ray.is_initialized()
        print("ok")
    """)
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok" and "Traceback" not in r.stderr
