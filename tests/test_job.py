"""The job users run, in real processes: a driver killed with SIGKILL then started again, and the
real `ray start --head` on loopback that test_autoscaling submits its jobs to (`ray_head`,
`submit_distill`, `MetricsScraper`: one head for the job-submit scenarios, not one each).

Process hygiene. This machine is shared with other people's Ray clusters running as the same
user, so nothing here may use `ray stop` (it stops *every* local Ray process of the user) or kill
by name. Every process a test starts gets two things in its environment, which every Ray process
below it inherits (gcs, raylet, dashboard, agents, workers, job drivers):

* ``RAY_TMPDIR`` = a private short directory: Ray's temp dir, sockets and, above all, its
  ``ray_current_cluster`` file live there, so nobody else's ``ray.init()`` finds and joins our
  head, and our drivers never join theirs (socket paths must stay under ~107 characters, hence a
  short ``/tmp/rd…`` directory rather than pytest's long ``tmp_path``);
* ``RAYDISTILL_TEST_MARKER`` = a fresh uuid: teardown finds exactly our processes by reading
  ``/proc/<pid>/environ`` and kills them by pid.

The tests don't use the ``ray_session`` fixture and don't import Ray in the test process for the
cluster work: they work the same whether or not another test already started a Ray here.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from contextlib import contextmanager

import pytest
import yaml

import tiny
from ports import free_ports

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)  # the venv's bin: python and ray with the project installed
MARKER_VAR = "RAYDISTILL_TEST_MARKER"


# ---------------------------------------------------------------- processes we start, and only those

def marked_pids(marker: str) -> list[int]:
    """Pids of live processes whose environment carries our marker (never this process)."""
    needle = f"{MARKER_VAR}={marker}".encode()
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                env = f.read()
            with open(f"/proc/{name}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if needle in env.split(b"\0") and state != b"Z":
            pids.append(int(name))
    return pids


def describe(pids: list[int]) -> list[str]:
    out = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
            out.append(f"{pid}: {cmdline[:160]}")
        except OSError:
            pass
    return out


def wait_gone(marker: str, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        left = marked_pids(marker)
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.5)


def kill_marked(marker: str, timeout: float = 30.0) -> list[str]:
    """SIGKILL every process carrying our marker, by pid; returns what had to be killed."""
    killed = []
    deadline = time.monotonic() + timeout
    while True:
        left = marked_pids(marker)
        if not left:
            return killed
        killed += describe(left)
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if time.monotonic() >= deadline:
            raise RuntimeError(f"processes of marker {marker} survive SIGKILL: {describe(left)}")
        time.sleep(0.5)


@contextmanager
def private_ray_env(prefix: str = "rdtest-"):
    """An environment for processes we start: venv first on PATH, private Ray temp dir, marker.

    Teardown kills whatever still carries the marker and removes the temp dir, test failed or not."""
    temp = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    marker = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # no RAY_ADDRESS etc.
    env.update({
        "PATH": BIN + os.pathsep + env.get("PATH", ""),
        "RAY_TMPDIR": temp,
        MARKER_VAR: marker,
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # every Ray server on 127.0.0.1
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
        "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",  # as in conftest: no test sends a node-drain notice
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
    })
    env.pop("PYTHONPATH", None)
    try:
        yield env, marker, temp
    finally:
        try:
            leftovers = kill_marked(marker)
            if leftovers:
                print("killed leftover processes:\n  " + "\n  ".join(leftovers))
        finally:
            shutil.rmtree(temp, ignore_errors=True)


# Ray gives a starting raylet a fixed 30 s to register with its GCS; on this shared 2-core machine
# under load that sometimes isn't enough. A start that failed this way did no work of ours, so the
# tests start again (a bounded number of times) rather than fail on the machine's load.
RAY_START_TIMEOUT = "timed out during startup"
DASHBOARD_START_TIMEOUT = "(it contains the error message from the dashboard)"  # same cause, the dashboard's wait
RAY_START_ATTEMPTS = 3
RAY_STARTED = "Ray runtime started."  # what `ray start` prints once its node has registered


def ray_start_timed_out(log_path) -> bool:
    log = tail(log_path, 10**7)
    return RAY_START_TIMEOUT in log or DASHBOARD_START_TIMEOUT in log


def tail(path, n: int = 6000) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()[-n:]
    except OSError as e:
        return f"<{path}: {e}>"


# ---------------------------------------------------------------- a tiny run's inputs

def tiny_assets(root, *, n_docs: int = 200, n_embd: int = 32):
    tok = tiny.make_tokenizer(str(root / "tokenizer"))
    tiny.make_gpt2(str(root / "teacher"), tok, n_layer=2, n_embd=n_embd, seed=1)
    corpus = tiny.write_corpus(str(root / "corpus.parquet"), tiny.corpus_texts(n_docs))
    return root / "teacher", corpus


def write_config(path, *, name, teacher, corpus, output_dir, **train) -> str:
    cfg = {
        "run": {"name": name, "output_dir": str(output_dir), "seed": 0},
        "data": {"path": str(corpus), "seq_len": 16, "eval_fraction": 0.1},
        "teacher": {"model": str(teacher), "replicas": 1, "cpus_per_replica": 0.5, "batch_size": 16},
        "targets": {"format": "sampled", "samples": 50, "shard_rows": 40},
        "student": {"init_from_teacher": {"n_layer": 1}},
        "train": {"workers": 2, "cpus_per_worker": 0.5, "batch_size": 16, "max_steps": 6,
                  "checkpoint_every": 3, "log_every": 1, "warmup_steps": 2, "lr": 3e-3, **train},
    }
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return str(path)


def load_json(path):
    with open(path) as f:
        return json.load(f)


def check_outputs(out, report, *, steps: int) -> dict:
    """What every finished run must leave behind; returns the store manifest."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import torch

    assert report["train"]["steps"] == steps and report["train"]["total_steps"] == steps
    assert math.isfinite(report["train"]["final_loss"])
    ev = report["eval"]
    assert ev["eval_sequences"] > 0
    for label in ("student", "teacher"):
        assert math.isfinite(ev[label]["ce"]) and ev[label]["ce"] > 0, ev
    assert math.isfinite(ev["student"]["kl_teacher_student"]) and ev["student"]["kl_teacher_student"] >= 0
    assert 0.0 <= ev["student"]["top1_agreement"] <= 1.0

    student_dir = os.path.join(out, "student")
    assert report["outputs"]["student"] == student_dir
    model = AutoModelForCausalLM.from_pretrained(student_dir).eval()
    tok = AutoTokenizer.from_pretrained(student_dir)
    assert model.config.n_layer == 1 and model.config.vocab_size == len(tok)
    ids = tok("the cat sat on a mat", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()

    manifest = load_json(os.path.join(out, "targets", "manifest.json"))
    train_rows = sum(s["rows"] for s in manifest["inputs"]["shards"].values())
    assert train_rows == report["inputs"]["train_rows"] > 0
    current = {sid: e["versions"][str(e["current"])] for sid, e in manifest["shards"].items()}
    assert set(current) == set(manifest["inputs"]["shards"])
    assert sum(r["rows"] for r in current.values()) == train_rows
    for sid, rec in current.items():
        assert rec["rows"] == manifest["inputs"]["shards"][sid]["rows"]
        assert os.path.exists(os.path.join(out, "targets", rec["path"]))
    return manifest


# ---------------------------------------------------------------- a real head for `ray job submit` (test_autoscaling)

@contextmanager
def ray_head(env, marker, temp, logs_dir, *, num_cpus: int = 8, autoscaling: dict | None = None,
             attempts: int = RAY_START_ATTEMPTS):
    """A real `ray start --head --block` on loopback, in its own session; stopped by pid at exit.

    `--block` keeps `ray start` in the foreground as the parent of gcs/raylet/dashboard: SIGTERM to
    it shuts those down gracefully; the marker sweep of `private_ray_env` catches the rest.

    `autoscaling`: an autoscaler config (node types, max_workers, idle_timeout_minutes, provider)
    for Ray's fake multi-node autoscaler; the head's GCS address is filled into its provider, as
    the fake nodes would otherwise dial port 6379. Its nodes are processes under the head's
    monitor, carrying our marker like every other process here."""
    (gcs, dash, metrics, client, agent_http, agent_grpc, env_agent,
     node_mgr, obj_mgr) = free_ports(9)
    cmd = [os.path.join(BIN, "ray"), "start", "--head", "--block", f"--port={gcs}", f"--num-cpus={num_cpus}",
           "--object-store-memory=200000000", f"--temp-dir={temp}",
           "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
           f"--metrics-export-port={metrics}", f"--ray-client-server-port={client}",
           f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
           f"--runtime-env-agent-port={env_agent}", f"--node-manager-port={node_mgr}",
           f"--object-manager-port={obj_mgr}", "--disable-usage-stats"]
    head = {"dashboard": f"http://127.0.0.1:{dash}", "gcs": f"127.0.0.1:{gcs}", "temp": temp, "leftover": []}
    if autoscaling is not None:
        config = dict(autoscaling, provider=dict(autoscaling["provider"], gcs_address=head["gcs"]))
        head["autoscaling_config"] = path = os.path.join(logs_dir, "autoscaling.json")
        with open(path, "w") as f:
            json.dump(config, f, indent=2)
        cmd.append(f"--autoscaling-config={path}")
        env = dict(env, RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")
    proc = log = None
    try:
        for attempt in range(1, attempts + 1):
            head["log"] = log_path = os.path.join(logs_dir, f"ray-head-{attempt}.log")
            log = open(log_path, "w")
            proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            deadline = time.monotonic() + 300
            while True:  # up: the head's raylet registered (it may still time out after the dashboard answers)
                if proc.poll() is not None:
                    break
                if RAY_STARTED in tail(log_path, 10**7):
                    try:
                        with urllib.request.urlopen(head["dashboard"] + "/api/version", timeout=5) as r:
                            if r.status == 200:
                                break
                    except OSError:
                        pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the head's dashboard did not come up:\n{tail(log_path)}")
                time.sleep(1)
            if proc.poll() is None:
                break
            log.close()
            if not ray_start_timed_out(log_path) or attempt == attempts:
                raise RuntimeError(f"ray start exited with {proc.returncode}:\n{tail(log_path)}")
            kill_marked(marker)  # what the failed start left behind, then again
        yield head
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
        if log is not None:
            log.close()
        # What a graceful stop left running (the caller's sweep kills it; the test reports it).
        head["leftover"] = describe(wait_gone(marker, 30))


def metrics_targets(temp: str) -> list[str]:
    """Every node's Prometheus endpoint, from the service-discovery file the head writes into its
    temp dir (what a user's Prometheus reads): the head's own and each worker node's."""
    try:
        with open(os.path.join(temp, "prom_metrics_service_discovery.json")) as f:
            groups = json.load(f)
    except (OSError, ValueError):
        return []
    return [f"http://{t}/metrics" for g in groups for t in g.get("targets", [])]


class MetricsScraper(threading.Thread):
    """Scrapes every node's Prometheus endpoint every second and keeps every raydistill sample seen
    (export is periodic, and a finished driver's series need not outlive it, nor a removed node's)."""

    def __init__(self, targets):
        super().__init__(daemon=True)
        self.targets, self.samples, self.scrapes = targets, {}, 0
        self.stop = threading.Event()

    def scrape(self, url: str) -> None:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                text = r.read().decode()
        except OSError:
            return
        self.scrapes += 1
        for line in text.splitlines():
            if line.startswith("ray_raydistill_"):
                series, _, value = line.rpartition(" ")
                self.samples[series] = float(value)

    def run(self):
        while not self.stop.is_set():
            for url in self.targets():
                self.scrape(url)
            self.stop.wait(1.0)

    def find(self, name: str, **labels) -> list[float]:
        want = [f'{k}="{v}"' for k, v in labels.items()]
        return [v for s, v in self.samples.items()
                if s.split("{")[0] in (name, name + "_total") and all(w in s for w in want)]


NO_AGENT = "No available agent to submit job"


def submit_distill(head, env, sub_id: str, config: str) -> None:
    """`ray job submit --no-wait` of jobs/distill.py with this repository as the working dir."""
    # env_vars the driver also sets for its workers: the job's own must win, not clash.
    runtime_env = json.dumps({
        "excludes": [".venv", ".git", "runs", "**/__pycache__", ".pytest_cache", ".hypothesis", "*.egg-info"],
        "env_vars": {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}})
    deadline = time.monotonic() + 120
    while True:
        submit = subprocess.run(
            [os.path.join(BIN, "ray"), "job", "submit", "--address", head["dashboard"],
             "--submission-id", sub_id, "--no-wait", "--working-dir", ROOT, "--runtime-env-json", runtime_env,
             "--", "python", "jobs/distill.py", "--config", config],
            env=env, capture_output=True, text=True, timeout=300)
        # The dashboard answers before the head's job agent has registered ("try again later").
        if submit.returncode == 0 or NO_AGENT not in submit.stderr or time.monotonic() > deadline:
            break
        time.sleep(3)
    assert submit.returncode == 0, submit.stdout + submit.stderr


def wait_job(head, sub_id: str, *, timeout: float, every=None):
    """Poll a submitted job to its end (stopped past `timeout`); `every(status)` runs at each poll.
    Returns (final status, the job's logs)."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(head["dashboard"])
    deadline = time.monotonic() + timeout
    while True:
        status = client.get_job_status(sub_id)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            break
        if time.monotonic() > deadline:
            client.stop_job(sub_id)
            break
        if every is not None:
            every(status)
        time.sleep(2)
    return status, client.get_job_logs(sub_id)


# ---------------------------------------------------------------- SIGKILL the driver, run it again

def snapshot_path(out, name) -> str:
    return os.path.join(out, "checkpoints", f"{name}-student", "checkpoint_manager_snapshot.json")


def registered_step(out, name) -> int | None:
    """Step of the newest checkpoint Ray Train has registered (what a new fit resumes from)."""
    try:
        snap = load_json(snapshot_path(out, name))
    except (OSError, ValueError):
        return None
    latest = snap.get("latest_checkpoint_result")
    return None if not latest else int(latest["metrics"]["step"])


def start_driver(config, env, log_path):
    log = open(log_path, "w")
    try:
        return subprocess.Popen([sys.executable, "jobs/distill.py", "--config", config], cwd=ROOT, env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    finally:
        log.close()  # the child has its own copy


def run_driver(config, env, marker, log_path, timeout):
    """Run the driver to its end (again if its local Ray failed to start); returns its exit code."""
    for attempt in range(1, RAY_START_ATTEMPTS + 1):
        path = f"{log_path}.{attempt}"
        proc = start_driver(config, env, path)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            pytest.fail(f"driver did not finish within {timeout} s:\n{tail(path)}")
        shutil.copyfile(path, log_path)
        if rc == 0 or not ray_start_timed_out(path) or attempt == RAY_START_ATTEMPTS:
            return rc
        kill_marked(marker)


@pytest.mark.timeout(1800)  # two full driver runs (Ray start, inputs, training, eval) on 2 busy cores
def test_driver_sigkill_then_rerun_resumes(tmp_path):
    # 13 steps per epoch: each epoch start re-reads the store, so 40 steps take long enough (even on
    # an idle machine) for a checkpoint to be registered well before the end.
    teacher, corpus = tiny_assets(tmp_path, n_docs=200, n_embd=64)
    out = tmp_path / "out"
    name = f"kill-{uuid.uuid4().hex[:8]}"
    steps, every = 40, 4
    config = write_config(tmp_path / "run.yaml", name=name, teacher=teacher, corpus=corpus, output_dir=out,
                          max_steps=steps, checkpoint_every=every, log_every=4)
    first_log = tmp_path / "first.log"

    with private_ray_env() as (env, marker, temp):
        attempt, proc = 1, start_driver(config, env, first_log)
        try:
            deadline = time.monotonic() + 720
            while registered_step(out, name) is None:
                if proc.poll() is not None:
                    if ray_start_timed_out(first_log) and attempt < RAY_START_ATTEMPTS:
                        kill_marked(marker)
                        attempt, proc = attempt + 1, start_driver(config, env, first_log)
                        continue
                    pytest.fail(f"driver exited ({proc.returncode}) before its first checkpoint:\n"
                                f"{tail(first_log)}")
                if time.monotonic() > deadline:
                    pytest.fail(f"no checkpoint registered in time:\n{tail(first_log)}")
                time.sleep(0.2)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)  # the driver and its process group, no warning
            proc.wait()
        assert proc.returncode == -signal.SIGKILL, "the driver finished before it could be killed"

        # The local cluster a driver starts goes down with it: gcs/raylet share its process group
        # (and die with their parent), workers exit when their raylet is gone.
        survivors = wait_gone(marker, 60)
        assert survivors == [], f"Ray processes outlived the killed driver: {describe(survivors)}"

        killed_at = registered_step(out, name)
        assert every <= killed_at < steps and killed_at % every == 0, killed_at
        assert not os.path.exists(out / "report.json")
        manifest_path = out / "targets" / "manifest.json"
        before = load_json(manifest_path)
        assert before["shards"] and all(e["current"] == 1 for e in before["shards"].values())

        second_log = tmp_path / "second.log"
        rc = run_driver(config, env, marker, second_log, timeout=840)
        assert rc == 0, tail(second_log)

    log2 = tail(second_log, 10**7)
    assert "teacher pass over" not in log2                     # nothing was scored again
    assert f"resumed from checkpoint at step {killed_at}" in log2
    report = load_json(out / "report.json")
    assert report["train"]["resumed_from_step"] == killed_at
    assert report["teacher_passes"] == []
    after = check_outputs(str(out), report, steps=steps)
    assert set(after["shards"]) == set(before["shards"])
    for sid, entry in after["shards"].items():
        assert entry["current"] == 1 and list(entry["versions"]) == ["1"], (sid, entry)
        old, new = before["shards"][sid]["versions"]["1"], entry["versions"]["1"]
        assert (new["created"], new["checksum"], new["rows"]) == (old["created"], old["checksum"], old["rows"])
    history = report["history"]["student"]
    assert history[-1]["step"] == steps
    assert any(h["step"] <= killed_at for h in history)        # history carried over from the checkpoint
