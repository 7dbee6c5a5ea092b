"""The cluster a run works on: where its outputs go, how teacher-shaped work is placed, joining or
starting Ray, and whether the run's replicas and workers can be placed — now, or once an
autoscaler has launched the nodes it may.

Fixed cluster (a local `ray.init`, or a head without `--autoscaling-config`): a run whose teacher
replica or train workers fit on no node is refused at once (`RAYDISTILL_RESOURCE_WAIT_S` seconds
of grace for nodes joined by hand).

Autoscaling cluster (`ray up cluster.yaml`, `ray start --head --autoscaling-config=...`): the node
types and their `max_workers` come from the autoscaling config the head's monitor was started
with. What no node type can ever hold is refused at once, naming the resource and the types; what
fits is accepted, and each phase (`wait_for_nodes`) asks the autoscaler for its replicas' or
workers' nodes (a pending placement group of their shape) and waits for them with a progress
line, up to `run.resource_wait_s`. The placement group is removed once the nodes are up — the
phase's own actors then hold them — so nodes go idle and are removed when the phase ends.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass

from .errors import RaydistillError
from .log import log


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


# ---------------------------------------------------------------------------- joining Ray


def init_ray(cfg) -> None:
    """Join the cluster of a submitted job (RAY_ADDRESS), or start a local one."""
    import ray

    if not ray.is_initialized():
        env = {"TOKENIZERS_PARALLELISM": "false"}
        if os.environ.get("RAY_ADDRESS"):
            # A submitted job: ray.init merges this runtime_env into the job's and refuses (ValueError)
            # one that sets an env var the job already sets (`--runtime-env-json '{"env_vars": ...}'`).
            env = {k: v for k, v in env.items() if k not in _job_env_vars()}
            ray.init(runtime_env={"env_vars": env} if env else None)
        else:
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # local Ray stays on loopback
            t, tr = cfg.teacher, cfg.train
            needed = t.replicas * t.cpus_per_replica + tr.workers * tr.cpus_per_worker
            # More logical CPUs than cores: passes, data tasks and train workers must all fit at once.
            ray.init(num_cpus=int(max(8, 2 * (os.cpu_count() or 2), needed + 4)), runtime_env={"env_vars": env})
    from ray.data import DataContext

    ctx = DataContext.get_current()
    if ctx.execution_no_progress_timeout_s != -1:
        # A pass that lost a node waits for the autoscaler's replacement: Ray Data must not give up first.
        ctx.execution_no_progress_timeout_s = max(ctx.execution_no_progress_timeout_s,
                                                  cfg.run.resource_wait_s + 300)


def _job_env_vars() -> dict:
    """env_vars of the submitted job's runtime_env (what `ray job submit` gave the driver)."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return {}
    try:
        return dict(((json.loads(raw) or {}).get("runtime_env") or {}).get("env_vars") or {})
    except (ValueError, TypeError, AttributeError):
        return {}


# ------------------------------------------------------------------- what a run asks for


@dataclass(frozen=True)
class Need:
    what: str          # for messages: "teacher replica (teacher.*)"
    per: dict          # resources of one replica / worker (zeros dropped)
    count: int         # how many the phase wants
    minimum: int       # how many it cannot do without


def needs(cfg) -> dict[str, Need]:
    """Per phase role: "teacher" (a pass's replicas), "eval" (one teacher-shaped task), "train"."""
    t, tr = cfg.teacher, cfg.train
    teacher = _nonzero({"CPU": t.cpus_per_replica, "GPU": t.gpus_per_replica, **t.resources})
    worker = _nonzero({"CPU": tr.cpus_per_worker, "GPU": 1.0 if tr.use_gpu else 0.0, **tr.resources})
    workers = max(tr.workers, 1)
    return {"teacher": Need("teacher replica (teacher.*)", teacher, max(t.replicas, 1), 1),
            "eval": Need("teacher replica (teacher.*)", teacher, 1, 1),
            "train": Need(f"{tr.workers} train worker(s) (train.*)", worker, workers, workers)}


def _nonzero(d: dict) -> dict:
    return {k: float(v) for k, v in d.items() if v and v > 0}


def _wait_s(cfg, autoscaling: bool) -> float:
    env = os.environ.get("RAYDISTILL_RESOURCE_WAIT_S")
    if env is not None:  # an explicit override (tests, a cluster with nodes joined by hand)
        return float(env)
    return float(cfg.run.resource_wait_s) if autoscaling else 0.0


# ------------------------------------------------------------------- the autoscaler's view


@dataclass(frozen=True)
class NodeType:
    name: str
    resources: dict | None  # None: not declared (CPU/GPU detected at launch, no custom resources)
    max_workers: int


@dataclass(frozen=True)
class Autoscaler:
    types: tuple[NodeType, ...] | None  # None: the head's config could not be read from here
    max_workers: int | None             # cap on worker nodes of all types together
    report: dict                        # the monitor's latest autoscaler_report (pending launches...)


def autoscaler() -> Autoscaler | None:
    """The cluster's autoscaler and the node types it may launch; None on a fixed cluster."""
    from ray.experimental.internal_kv import _internal_kv_get

    import ray._private.ray_constants as ray_constants

    try:
        raw = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
        status = json.loads(raw) if raw else {}
    except (ValueError, TypeError, ConnectionError):
        status = {}
    report = status.get("autoscaler_report") or {}
    if not report:
        return None
    path = _monitor_config_path(status.get("monitor_pid"))
    if path is None:
        # Driver not on the head: a read-only monitor (fixed cluster) names nodes "node_<id>".
        if all(str(t).startswith("node_") for t in report.get("active_nodes") or {}):
            return None
        return Autoscaler(None, None, report)
    if path == "":
        return None  # the monitor runs without an autoscaling config: a fixed cluster
    return _read_autoscaling_config(path, report)


def _monitor_config_path(pid) -> str | None:
    """--autoscaling-config of the head's monitor process: "" if it has none, None if unreadable."""
    try:
        with open(f"/proc/{int(pid)}/cmdline", "rb") as f:
            args = f.read().decode(errors="replace").split("\0")
    except (OSError, TypeError, ValueError):
        return None
    if not any(a.endswith("monitor.py") for a in args):
        return None  # pid reused, or another machine's process: not the head's monitor
    for a in args:
        if a.startswith("--autoscaling-config="):
            return os.path.expanduser(a.split("=", 1)[1])
    return ""


def _read_autoscaling_config(path: str, report: dict) -> Autoscaler:
    import yaml

    try:
        with open(path) as f:
            config = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError):
        return Autoscaler(None, None, report)
    head = config.get("head_node_type")
    types = tuple(NodeType(name, _nonzero(spec.get("resources") or {}) or None, int(spec.get("max_workers", 0)))
                  for name, spec in (config.get("available_node_types") or {}).items() if name != head)
    cap = config.get("max_workers")
    return Autoscaler(types, int(cap) if cap is not None else None, report)


# ---------------------------------------------------------------------- placement arithmetic


def _copies(per: dict, node: dict | None) -> int:
    """How many `per` fit on a node offering `node` (None: undeclared, CPU/GPU detected at launch)."""
    if node is None:
        return 0 if any(k not in ("CPU", "GPU", "memory") for k in per) else 1
    return min((int(node.get(k, 0) // v) for k, v in per.items()), default=1)


def _alive() -> list[dict]:
    import ray

    return [n["Resources"] for n in ray.nodes() if n.get("Alive")]


def _fits_now(need: Need, nodes: list[dict]) -> int:
    return sum(_copies(need.per, n) for n in nodes)


def _ever_fits(need: Need, nodes: list[dict], scaler: Autoscaler) -> int:
    """Copies placeable once the autoscaler has launched all it may (the nodes alive count too)."""
    if scaler.types is None:
        return need.count  # node types unknown here: do not refuse what may come
    slots = sorted((_copies(need.per, t.resources) for t in scaler.types for _ in range(t.max_workers)),
                   reverse=True)
    launched = slots[:scaler.max_workers] if scaler.max_workers is not None else slots
    return max(_fits_now(need, nodes), _head_copies(need, nodes) + sum(launched))


def _head_copies(need: Need, nodes: list[dict]) -> int:
    """The head never goes away; worker nodes alive are among what the types may launch."""
    return sum(_copies(need.per, n) for n in nodes if HEAD_RESOURCE in n)


HEAD_RESOURCE = "node:__internal_head__"  # the resource Ray gives the head node only


def _fmt(per: dict) -> str:
    return "{" + ", ".join(f"{k}={v:g}" for k, v in per.items()) + "}"


def _offer(nodes: list[dict]) -> str:
    return " | ".join(", ".join(f"{k}={v:g}" for k, v in sorted(n.items())
                                if not k.startswith("node:") and "memory" not in k) for n in nodes)


def _shortfall(need: Need, nodes: list[dict]) -> str | None:
    """None if `need.minimum` copies fit on the nodes, else a sentence naming what is missing."""
    if _fits_now(need, nodes) >= need.minimum:
        return None
    return f"{need.what} need {need.minimum} × {_fmt(need.per)} but the nodes offer [{_offer(nodes)}]"


def _never(need: Need, nodes: list[dict], scaler: Autoscaler) -> str | None:
    """None if the autoscaler can bring up room for `need.minimum`, else what no node type holds."""
    can = _ever_fits(need, nodes, scaler)
    if can >= need.minimum:
        return None
    types = "; ".join(f"{t.name} {_fmt(t.resources or {})} × ≤{t.max_workers}" for t in scaler.types)
    absent = [k for k, v in need.per.items()
              if all((t.resources or {}).get(k, 0) < v for t in scaler.types) and all(n.get(k, 0) < v for n in nodes)]
    if absent:
        why = f"no node type offers {', '.join(f'{k}={need.per[k]:g}' for k in absent)}"
    elif can == 0:  # each resource exists somewhere, never all on one node type
        short = [f"{t.name} " + ", ".join(f"{k}={(t.resources or {}).get(k, 0):g}" for k, v in need.per.items()
                                          if (t.resources or {}).get(k, 0) < v) for t in scaler.types]
        why = "no node type holds one (short: " + "; ".join(short) + ")"
    else:
        why = f"at most {can} fit on the nodes it may launch"
    return (f"{need.what} need {need.minimum} × {_fmt(need.per)}: {why} (autoscaler node types: {types}; "
            f"nodes up: [{_offer(nodes)}])")


# ---------------------------------------------------------------------------- the checks


def check_resources(cfg, timeout_s: float | None = None) -> None:
    """Refuse, before any work, a run whose teacher replica or train workers can never be placed.

    On an autoscaling cluster a run that fits the node types it may launch is accepted at once
    (each phase then waits for its nodes: `wait_for_nodes`)."""
    roles = needs(cfg)
    todo = [roles["eval"], roles["train"]]  # online mode too: evaluation runs placed like a replica
    nodes = _alive()
    if not any(_shortfall(n, nodes) for n in todo):
        return
    scaler = autoscaler()
    if scaler is not None:
        never = [m for m in (_never(n, nodes, scaler) for n in todo) if m]
        if never:
            raise RaydistillError("not enough cluster resources: " + "; ".join(never) +
                                  " — lower teacher.replicas / train.workers or their per-replica resources, "
                                  "or add a node type with those resources (cluster.yaml available_node_types)")
        wait = timeout_s if timeout_s is not None else _wait_s(cfg, True)
        log(f"the autoscaler can launch the nodes this run needs; each phase waits up to {wait:g} s "
            "(run.resource_wait_s) for its own")
        return
    deadline = time.monotonic() + (timeout_s if timeout_s is not None else _wait_s(cfg, False))
    while True:
        missing = [m for m in (_shortfall(n, nodes) for n in todo) if m]
        if not missing:
            return
        if time.monotonic() >= deadline:
            raise RaydistillError("not enough cluster resources: " + "; ".join(missing) +
                                  " — lower teacher.replicas / train.workers or their per-replica resources, "
                                  "or add nodes with those resources (cluster.yaml)")
        time.sleep(2)
        nodes = _alive()


def wait_for_nodes(cfg, role: str, *, say_every_s: float = 10.0) -> None:
    """Before a phase: room for its replicas or workers ("teacher", "eval", "train"), asking an
    autoscaler for the nodes and waiting with a progress line up to `run.resource_wait_s`."""
    need = needs(cfg)[role]
    if _fits_now(need, _alive()) >= need.count:
        return
    scaler = autoscaler()
    if scaler is None:
        return  # fixed cluster: check_resources refused what cannot run; Ray queues the rest
    from ray.util.placement_group import placement_group, remove_placement_group

    target = min(need.count, _ever_fits(need, _alive(), scaler))
    wait_s = _wait_s(cfg, True)
    log(f"waiting up to {wait_s:g} s (run.resource_wait_s) for {target} × {_fmt(need.per)} ({need.what}): "
        "asking the autoscaler for nodes")
    # A pending placement group of the phase's shape is the autoscaler's demand until the nodes are
    # up. Not request_resources: that is one cluster-wide slot, which Ray Data also sets and clears.
    pg = placement_group([dict(need.per)] * target, strategy="SPREAD", name=f"raydistill-wait-{role}")
    start, said = time.monotonic(), -math.inf
    try:
        while True:
            ready = pg.wait(timeout_seconds=2)
            up = _fits_now(need, _alive())
            if ready or up >= target:
                log(f"{max(up, target if ready else 0)} × {_fmt(need.per)} up after {time.monotonic() - start:.0f} s")
                return
            waited = time.monotonic() - start
            if waited >= wait_s:
                if up >= need.minimum:
                    log(f"only {up} of {target} × {_fmt(need.per)} up after {waited:.0f} s "
                        "(run.resource_wait_s); going on with those", warning=True)
                    return
                raise RaydistillError(
                    f"not enough cluster resources: {need.what} need {need.minimum} × {_fmt(need.per)} and "
                    f"{up} were up after waiting {waited:.0f} s (run.resource_wait_s) for the autoscaler — "
                    "check `ray status` and the autoscaler log (monitor.log) for failed launches, or raise "
                    "run.resource_wait_s")
            if waited - said >= say_every_s:
                said = waited
                log(f"waiting for {target} × {_fmt(need.per)}: {up} of {target} up, "
                    f"{_launching(need, autoscaler() or scaler)} launching ({waited:.0f} s)")
    finally:
        remove_placement_group(pg)  # the phase's own actors hold the nodes from here


def _launching(need: Need, scaler: Autoscaler) -> str:
    """Nodes being launched that can hold `need.per`, by type, as the autoscaler reports them."""
    fit = {t.name for t in scaler.types if _copies(need.per, t.resources)} if scaler.types is not None else None
    counts: dict[str, int] = {}
    for name, n in (scaler.report.get("pending_launches") or {}).items():
        counts[name] = counts.get(name, 0) + int(n)
    for node in scaler.report.get("pending_nodes") or []:
        counts[node[1]] = counts.get(node[1], 0) + 1
    counts = {k: v for k, v in counts.items() if fit is None or k in fit}
    total = sum(counts.values())
    return f"{total} node(s)" + (" (" + ", ".join(f"{v} {k}" for k, v in counts.items()) + ")" if counts else "")
