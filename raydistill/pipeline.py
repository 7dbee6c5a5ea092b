"""One distillation run, phase by phase: check → inputs → teacher pass → train → export → eval → report.

Every phase is resumable: inputs already recorded are kept, shards already committed for this
teacher revision and format are not re-scored, training continues from its newest checkpoint.
Everything that can be checked without a cluster (config, models, vocabularies, paths) is checked
before Ray starts, so bad input leaves the store and the outputs as they were.
"""
from __future__ import annotations

import os
import shutil
import time
import uuid

from .errors import ConfigError, RaydistillError

NAMESPACE = "raydistill"


def output_dir(cfg) -> str:
    d = cfg.run.output_dir
    return d if "://" in d else os.path.abspath(os.path.expanduser(d))


def check_output_dir(cfg) -> None:
    """An unwritable output directory fails now, not after an hour of teacher passes."""
    d = output_dir(cfg)
    if "://" in d:
        return
    probe_dir = d
    while not os.path.exists(probe_dir):
        probe_dir = os.path.dirname(probe_dir)
    if not os.path.isdir(probe_dir) or not os.access(probe_dir, os.W_OK | os.X_OK):
        raise ConfigError([f"run.output_dir: cannot write to {d} ({probe_dir} is not a writable "
                           "directory) — choose a directory you can write, e.g. run.output_dir=runs/mine"])


def preflight(cfg):
    """All the checks that need no cluster; returns the models' info."""
    from .data import resolve_corpus
    from .models import preflight as check_models

    check_output_dir(cfg)
    info = check_models(cfg)
    resolve_corpus(cfg.data)
    return info


def init_ray(cfg) -> None:
    """Join the cluster of a submitted job (RAY_ADDRESS), or start a local one."""
    import ray

    if ray.is_initialized():
        return
    env = {"TOKENIZERS_PARALLELISM": "false"}
    if os.environ.get("RAY_ADDRESS"):
        # A submitted job: ray.init merges this runtime_env into the job's and refuses (ValueError)
        # one that sets an env var the job already sets (`--runtime-env-json '{"env_vars": ...}'`).
        env = {k: v for k, v in env.items() if k not in _job_env_vars()}
        ray.init(runtime_env={"env_vars": env} if env else None)
        return
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # local Ray stays on loopback
    needed = cfg.teacher.replicas * cfg.teacher.cpus_per_replica + cfg.train.workers * cfg.train.cpus_per_worker
    # More logical CPUs than cores: passes, data tasks and train workers must all fit at once.
    ray.init(num_cpus=int(max(8, 2 * (os.cpu_count() or 2), needed + 4)), runtime_env={"env_vars": env})


def _job_env_vars() -> dict:
    """env_vars of the submitted job's runtime_env (what `ray job submit` gave the driver)."""
    import json

    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return {}
    try:
        return dict(((json.loads(raw) or {}).get("runtime_env") or {}).get("env_vars") or {})
    except (ValueError, TypeError, AttributeError):
        return {}


def check_resources(cfg, timeout_s: float | None = None) -> None:
    """Refuse, within a bounded time, a run whose replicas or workers can never be placed."""
    import ray

    timeout_s = float(os.environ.get("RAYDISTILL_RESOURCE_WAIT_S", "0")) if timeout_s is None else timeout_s
    t, tr = cfg.teacher, cfg.train
    teacher = {"CPU": t.cpus_per_replica, "GPU": t.gpus_per_replica, **t.resources}
    worker = {"CPU": tr.cpus_per_worker, "GPU": 1.0 if tr.use_gpu else 0.0, **tr.resources}
    # Online mode still needs one teacher-shaped slot: evaluation runs in a task placed like a replica.
    needs = {"teacher replica (teacher.*)": (teacher, 1),
             f"{tr.workers} train worker(s) (train.*)": (worker, max(tr.workers, 1))}
    deadline = time.monotonic() + timeout_s
    while True:
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        missing = [_shortfall(what, per, count, nodes) for what, (per, count) in needs.items() if count]
        missing = [m for m in missing if m]
        if not missing:
            return
        if time.monotonic() >= deadline:
            raise RaydistillError("not enough cluster resources: " + "; ".join(missing) +
                                  " — lower teacher.replicas / train.workers or their per-replica resources, "
                                  "or add nodes with those resources (cluster.yaml)")
        time.sleep(2)


def _shortfall(what: str, per: dict, count: int, nodes: list[dict]) -> str | None:
    """None if `count` copies of `per` fit on the nodes, else a sentence naming what is missing."""
    def copies(node):
        return min(int(node.get(k, 0) // v) for k, v in per.items() if v > 0)

    if sum(copies(n) for n in nodes) >= count:
        return None
    want = ", ".join(f"{k}={v:g}" for k, v in per.items() if v > 0)
    have = " | ".join(", ".join(f"{k}={v:g}" for k, v in sorted(n.items())
                                if not k.startswith("node:") and "memory" not in k) for n in nodes)
    return f"{what} need {count} × {{{want}}} but the nodes offer [{have}]"


def open_store(cfg, info):
    from .store import SoftTargetStore
    from .teacher import target_params

    return SoftTargetStore.open(cfg.store_uri, tokenizer=info.tokenizer, targets=target_params(cfg.targets))


def score_pending(cfg, store, info, metrics=None) -> dict | None:
    """Initial teacher pass: every shard with no valid current version for this teacher and format."""
    from .teacher import run_teacher_pass, target_params

    damaged = store.verify_all()
    for sid, reason in damaged.items():
        print(f"raydistill: shard {sid} is damaged ({reason}); it will be re-scored", flush=True)
        store.invalidate(sid, reason)
    pending = store.pending(info.teacher_rev, target_params(cfg.targets))
    if not pending:
        return None
    print(f"raydistill: teacher pass over {len(pending)} of {len(store.shard_ids())} shards", flush=True)
    stats = run_teacher_pass(cfg, store, pending, vocab_size=info.vocab_size, teacher_rev=info.teacher_rev,
                             step=-1, source="initial", seed=cfg.run.seed, metrics=metrics)
    return dict(stats, damaged=damaged)  # {shard_id: reason}: reported in report.json's teacher_passes


def export_student(result, cfg, out_dir: str, name: str) -> str:
    """Copy the final checkpoint's student (save_pretrained) + the tokenizer to <output_dir>/<name>."""
    from .models import load_tokenizer

    final = os.path.join(out_dir, name)
    tmp = os.path.join(out_dir, f".tmp-{name}-{uuid.uuid4().hex[:8]}")
    with result.checkpoint.as_directory() as d:
        shutil.copytree(os.path.join(d, "student"), tmp)
    load_tokenizer(cfg.teacher.model, trust_remote_code=cfg.teacher.trust_remote_code).save_pretrained(tmp)
    if os.path.exists(final):
        shutil.rmtree(final)
    os.rename(tmp, final)
    return final


def _evaluate_task(student_dirs: dict, teacher: str, dtype: str, trust_remote_code: bool,
                   eval_uri: tuple, batch_size: int, max_rows: int, cfg_dict: dict) -> dict:
    import pyarrow.parquet as pq

    from .evaluate import eval_input_ids, evaluate
    from .models import load_causal_lm
    from .store import SoftTargetStore

    store = SoftTargetStore(eval_uri[0])
    table = pq.read_table(store.full_path(eval_uri[1]), filesystem=store.filesystem)
    ids = eval_input_ids(table, max_rows=max_rows)
    teacher_model = load_causal_lm(teacher, dtype=dtype, trust_remote_code=trust_remote_code)
    from .config import Config
    from .models import build_student

    cfg = Config.from_dict(cfg_dict, check_paths=False)
    # The same student before training: the baseline that shows what distillation moved.
    models = {"student_init": build_student(cfg.student, teacher, trust_remote_code=trust_remote_code,
                                            seed=cfg.run.seed)}
    models.update({label: load_causal_lm(path, key=label) for label, path in student_dirs.items()})
    out = {"eval_sequences": int(ids.shape[0])}
    for label, model in models.items():
        res = evaluate(model, teacher_model, ids, batch_size=batch_size)
        out[label] = res["student"]
        out["teacher"] = res["teacher"]
        out["tokens"] = res["tokens"]
    return out


def evaluate_students(cfg, store, student_dirs: dict, max_rows: int = 512) -> dict:
    """Held-out CE, KL(teacher‖student), top-1 agreement, in a task placed like a teacher replica."""
    import ray

    if store.manifest()["inputs"]["info"].get("eval_rows", 0) == 0:
        return {"note": "no held-out sequences (data.eval_fraction is 0 or the corpus is tiny)"}
    t = cfg.teacher
    task = ray.remote(_evaluate_task).options(num_cpus=t.cpus_per_replica, num_gpus=t.gpus_per_replica,
                                             resources=dict(t.resources) or None)
    manifest = store.manifest()
    return ray.get(task.remote(student_dirs, os.path.expanduser(t.model), t.dtype, t.trust_remote_code,
                               (store.uri, manifest["inputs"]["eval"]), t.batch_size, max_rows,
                               cfg.to_dict()))


def run(cfg) -> dict:
    """All phases of one run; returns the report (also written to <output_dir>/report.json)."""
    from .metrics import RunMetrics
    from .report import write_report
    from .train import fit_student, read_final_state

    phases: dict[str, float] = {}
    clock = time.perf_counter()

    def phase(name):
        nonlocal clock
        now = time.perf_counter()
        phases[name] = round(now - clock, 3)
        clock = now

    info = preflight(cfg)
    phase("preflight")
    init_ray(cfg)
    check_resources(cfg)
    metrics = RunMetrics(cfg.run.name)
    out = output_dir(cfg)
    os.makedirs(out, exist_ok=True)
    phase("ray_start")

    from .data import build_inputs

    store = open_store(cfg, info)
    inputs = build_inputs(cfg, store, info)
    phase("inputs")
    passes = []
    if not cfg.train.online:
        first = score_pending(cfg, store, info, metrics)
        if first:
            passes.append(first)
    phase("teacher_pass")

    sched, fit_kw, refresh = None, {}, None
    if cfg.mode == "mixed":  # the refresh scheduler actor re-scores a fraction of the shards as training goes
        from .refresh import finish_scheduler, fit_kwargs, scheduler_name, start_scheduler
        sched = start_scheduler(cfg, store, info, scheduler_name(cfg), NAMESPACE)
        fit_kw = fit_kwargs(cfg, scheduler_name(cfg), NAMESPACE)
    try:
        result, total = fit_student(cfg, store, info.vocab_size, label="student", **fit_kw)
    finally:
        if sched is not None:
            refresh = finish_scheduler(sched)  # waits for a pass in flight, then stops the actor
    if result.error:
        raise result.error
    state = read_final_state(result)
    students = {"student": export_student(result, cfg, out, "student")}
    phase("train")
    history = {"student": state["history"]}
    if cfg.run.compare_hard_labels:
        base, _ = fit_student(cfg, store, info.vocab_size, label="hard_label", alpha=0.0)
        if base.error:
            raise base.error
        history["hard_label"] = read_final_state(base)["history"]
        students["hard_label_student"] = export_student(base, cfg, out, "hard_label_student")
        phase("train_hard_label")

    evaluation = evaluate_students(cfg, store, students)
    phase("eval")
    summary = dict(store.summary(), format=cfg.targets.format)
    train_tokens = [h["tokens_per_s"] for h in state["history"]]
    report = {
        "run": {"name": cfg.run.name, "mode": cfg.mode, "output_dir": out, "store": store.uri},
        "config": cfg.to_dict(),
        "phases": phases,
        "inputs": inputs,
        "teacher_passes": passes,
        "store": summary,
        "train": {"steps": state["step"], "total_steps": total,
                  "tokens_per_s": sum(train_tokens) / len(train_tokens) if train_tokens else None,
                  "final_loss": state["history"][-1]["loss"] if state["history"] else None,
                  "resumed_from_step": state.get("resumed_from")},
        "history": history,
        "eval": evaluation,
        "outputs": {"student": students["student"], "report": os.path.join(out, "report.json")},
    }
    from .refresh import teacher_compute
    t = cfg.train
    online = state["step"] * max(t.workers, 1) * t.batch_size * t.grad_accum * cfg.data.seq_len
    report["teacher_compute"] = teacher_compute(passes, refresh, online_tokens=online if t.online else 0)
    if refresh is not None:
        report["ages"] = refresh.pop("ages")
        report["refresh"] = refresh
    report["files"] = write_report(out, report)
    return report
