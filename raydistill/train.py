"""Student training: Ray Train DDP over the soft-target store (or a live teacher, `train.online`).

Each epoch re-executes a Ray Data dataset of shard ids whose map step reads the manifest and
loads that shard's *current* version, so refreshed shards are picked up at epoch start and a
superseded version is never counted twice. Ray Train splits it equally over the ranks
(`streaming_split(equal=True)`), so every rank runs the same number of steps.

Checkpoints are directories:

    model.safetensors     student weights (loaded without pickle)
    optimizer.pt          optimizer + LR-scheduler state (torch.load(weights_only=True))
    state.json            step, epoch, config, loss history
    student/              (final checkpoint only) save_pretrained of the student

A restarted worker group (worker died, `train.max_failures`) or a re-run of the same run name
resumes from the newest checkpoint at its step and skips the batches of the epoch already done.
"""
from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import torch

from .losses import distill_loss, temperature_at
from .shard_reader import store_dataset
from .targets import decode, from_logits


def print0(*args) -> None:
    """Rank-0 logging: one line per event, not one per worker."""
    import ray.train

    if ray.train.get_context().get_world_rank() == 0:
        # The process's own stdout: Ray Train's print patch would otherwise tee each line twice.
        print(*args, flush=True, file=sys.__stdout__)


# ---------------------------------------------------------------- data

def dataset_schema(what: str, fmt: str, vocab_size: int) -> pa.Schema:
    from .targets import arrow_schema, id_type

    if what == "inputs":
        return pa.schema([("seq_id", pa.int64()), ("input_ids", pa.list_(id_type(vocab_size)))])
    return arrow_schema(fmt, vocab_size)


# ---------------------------------------------------------------- checkpoints

def save_checkpoint(path: str, model, optimizer, scheduler, state: dict, *, export_dir=None) -> None:
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    weights = {k: v.detach().contiguous().cpu() for k, v in unwrap(model).state_dict().items()}
    save_file(_untie(weights), os.path.join(path, "model.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
               os.path.join(path, "optimizer.pt"))
    with open(os.path.join(path, "state.json"), "w") as f:
        json.dump(state, f)
    if export_dir:
        unwrap(model).save_pretrained(os.path.join(path, export_dir))


def _untie(weights: dict) -> dict:
    """safetensors refuses shared storage (tied embeddings): store each tensor once, cloned."""
    seen, out = set(), {}
    for k, v in weights.items():
        ptr = v.data_ptr()
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    return out


def load_checkpoint(path: str, model, optimizer, scheduler) -> dict:
    from safetensors.torch import load_file

    unwrap(model).load_state_dict(load_file(os.path.join(path, "model.safetensors")), strict=False)
    opt = torch.load(os.path.join(path, "optimizer.pt"), weights_only=True)
    optimizer.load_state_dict(opt["optimizer"])
    scheduler.load_state_dict(opt["scheduler"])
    with open(os.path.join(path, "state.json")) as f:
        return json.load(f)


def unwrap(model):
    return model.module if hasattr(model, "module") else model


def lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return f


def _maybe_inject_fault(fault: dict | None, step: int, rank: int) -> None:
    """Test hook (RAYDISTILL_KILL_AT_STEP/_RANK/_MARKER on the driver): one worker process dies once."""
    if fault and step == fault["step"] and rank == fault["rank"] and not os.path.exists(fault["marker"]):
        open(fault["marker"], "w").close()
        # Let the controller register the last report first, as it would in any run whose
        # checkpoints are minutes apart (it polls workers every few seconds).
        time.sleep(fault.get("delay_s", 5.0))
        os._exit(1)


def _fault_from_env() -> dict | None:
    at, marker = os.environ.get("RAYDISTILL_KILL_AT_STEP"), os.environ.get("RAYDISTILL_KILL_MARKER")
    if not (at and marker):
        return None
    return {"step": int(at), "rank": int(os.environ.get("RAYDISTILL_KILL_RANK", "0")), "marker": marker}


class SeqIdAudit:
    """Optional record of the seq_ids each rank trained on, per epoch (RAYDISTILL_AUDIT_DIR):
    evidence that ranks see disjoint rows and no row twice in an epoch, refreshes included."""

    def __init__(self, directory: str | None, label: str, rank: int):
        self.directory, self.label, self.rank = directory, label, rank
        self.ids: list[np.ndarray] = []

    def add(self, batch: pa.Table) -> None:
        if self.directory:
            self.ids.append(batch.column("seq_id").to_numpy())

    def close_epoch(self, epoch: int) -> None:
        if self.directory and self.ids:
            os.makedirs(self.directory, exist_ok=True)
            path = os.path.join(self.directory, f"{self.label}-rank{self.rank}-epoch{epoch}-{time.time_ns()}.npy")
            np.save(path, np.concatenate(self.ids))
        self.ids = []


# ---------------------------------------------------------------- the loop (runs on every worker)

def train_loop(loop_cfg: dict) -> None:
    import ray.train
    import ray.train.torch

    from .config import Config
    from .metrics import RunMetrics
    from .models import build_student, load_causal_lm

    cfg = Config.from_dict(loop_cfg["config"], check_paths=False)
    t, alpha, label = cfg.train, loop_cfg["alpha"], loop_cfg["label"]
    total_steps, steps_per_epoch = loop_cfg["total_steps"], loop_cfg["steps_per_epoch"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(t.cpus_per_worker)))
    torch.manual_seed(cfg.run.seed)
    device = ray.train.torch.get_device()
    model = build_student(cfg.student, cfg.teacher.model, trust_remote_code=cfg.teacher.trust_remote_code,
                          seed=cfg.run.seed)
    model = ray.train.torch.prepare_model(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(t.warmup_steps, total_steps))
    teacher = None
    if t.online:  # the baseline: the teacher's forward runs inside every student step
        teacher = load_causal_lm(cfg.teacher.model, dtype=cfg.teacher.dtype,
                                 trust_remote_code=cfg.teacher.trust_remote_code,
                                 allow_pickle_weights=cfg.teacher.allow_pickle_weights).to(device)

    step, history, resumed_from = 0, [], None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = load_checkpoint(d, model, optimizer, scheduler)
        step, history, resumed_from = state["step"], state["history"], state["step"]
        print0(f"[{label}] resumed from checkpoint at step {step}")

    metrics = RunMetrics(cfg.run.name) if rank == 0 else None
    amp = device.type == "cuda"
    fmt = loop_cfg["format"]
    shard = ray.train.get_dataset_shard("train")
    start, last_log, tokens_since = time.perf_counter(), time.perf_counter(), 0
    audit = SeqIdAudit(loop_cfg.get("audit_dir"), label, rank)
    while step < total_steps:
        epoch = step // steps_per_epoch
        skip = (step % steps_per_epoch) * t.grad_accum  # batches of this epoch already trained on
        micro, ran = 0, False
        for i, batch in enumerate(shard.iter_batches(batch_size=t.batch_size, batch_format="pyarrow",
                                                     drop_last=True)):
            if i < skip or step >= total_steps:
                continue  # every rank still drains its split: streaming_split waits for all consumers
            ran = True
            audit.add(batch)
            if fmt == "inputs":
                input_ids = torch.from_numpy(np.stack(batch.column("input_ids").to_numpy(zero_copy_only=False))
                                             .astype(np.int64))
                targets = None
            else:
                input_ids, targets = decode(batch, fmt)
            input_ids = input_ids.to(device)
            labels = input_ids[:, 1:]
            if teacher is not None:
                with torch.inference_mode():
                    targets = from_logits(teacher(input_ids=input_ids).logits[:, :-1].float(), labels)
                targets = _clone_targets(targets)
            elif targets is not None:
                targets = targets.to(device)
            temperature = temperature_at(t.temperature_schedule.kind,
                                         _or(t.temperature_schedule.start, t.temperature),
                                         _or(t.temperature_schedule.end, t.temperature), step, total_steps)
            sync = (micro + 1) % t.grad_accum == 0
            with (model.no_sync() if not sync and hasattr(model, "no_sync") else _null()):
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    logits = model(input_ids=input_ids).logits[:, :-1]
                if targets is None:
                    from .losses import ce_loss
                    loss, parts = ce_loss(logits, labels), {}
                    parts = {"kd": 0.0, "ce": loss.item()}
                else:
                    loss, parts = distill_loss(logits, targets, labels, alpha=alpha, temperature=temperature,
                                               loss=t.loss, jsd_beta=t.jsd_beta)
                (loss / t.grad_accum).backward()
            micro += 1
            tokens_since += input_ids.numel() * world
            if not sync:
                continue
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            _maybe_inject_fault(loop_cfg.get("fault"), step, rank)
            if step % t.log_every == 0 or step == total_steps:
                now = time.perf_counter()
                tps = tokens_since / max(now - last_log, 1e-9)
                eta = (now - start) / max(step - (resumed_from or 0), 1) * (total_steps - step)
                history.append({"step": step, "loss": float(loss), "kd": parts["kd"], "ce": parts["ce"],
                                "tokens_per_s": tps, "temperature": temperature})
                print0(f"[{label}] step {step}/{total_steps} loss {float(loss):.4f} kd {parts['kd']:.4f} "
                       f"ce {parts['ce']:.4f} {tps:,.0f} tok/s ETA {eta:.0f}s")
                if metrics is not None:
                    metrics.train_step(float(loss), tps, step)
                last_log, tokens_since = now, 0
            if loop_cfg.get("scheduler") and rank == 0:
                _notify_scheduler(loop_cfg["scheduler"], step, model, loop_cfg)
            if step % t.checkpoint_every == 0 or step == total_steps:
                _report(step, model, optimizer, scheduler, history, resumed_from, rank,
                        final=step == total_steps, cfg_dict=loop_cfg["config"])
        audit.close_epoch(epoch)
        if not ran and skip == 0:
            raise RuntimeError(f"[{label}] the training split of rank {rank} is empty: the store has fewer "
                               f"rows than train.workers × train.batch_size")


def _or(value, default):
    return default if value is None else value


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _clone_targets(targets):
    """Tensors made under inference_mode can't enter autograd graphs; clone them out of it."""
    from dataclasses import replace

    return replace(targets, logprobs=targets.logprobs.clone(),
                   label_logprob=None if targets.label_logprob is None else targets.label_logprob.clone())


def _report(step, model, optimizer, scheduler, history, resumed_from, rank, *, final, cfg_dict) -> None:
    import ray.train

    metrics = {"step": step, "loss": history[-1]["loss"] if history else float("nan"),
               "resumed_from_step": -1 if resumed_from is None else resumed_from}
    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as d:
        save_checkpoint(d, model, optimizer, scheduler,
                        {"step": step, "history": history, "config": cfg_dict, "resumed_from": resumed_from},
                        export_dir="student" if final else None)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


_SCHEDULERS: dict = {}  # (name, namespace) -> actor handle: one GCS lookup per worker, not per step


def _notify_scheduler(name: str, step: int, model, loop_cfg: dict) -> None:
    """Tell the refresh scheduler the student's step (fire and forget: training never waits).
    The handle outlives actor restarts; calls made while it restarts are queued and retried."""
    import ray

    key = (name, loop_cfg.get("namespace"))
    actor = _SCHEDULERS.get(key)
    if actor is None:
        try:
            actor = _SCHEDULERS[key] = ray.get_actor(name, namespace=key[1])
        except ValueError:
            return
    policy_dir = loop_cfg.get("policy_dir")
    every = loop_cfg.get("policy_every") or 0
    if policy_dir and every and step % every == 0:
        _save_policy(unwrap(model), policy_dir, step)
    actor.on_step.remote(step)


def _save_policy(model, policy_dir: str, step: int) -> None:
    """The current student for on-policy refresh: written aside, then renamed into place."""
    tmp = os.path.join(policy_dir, f".tmp-{step}")
    model.save_pretrained(tmp)
    with open(os.path.join(tmp, "step.txt"), "w") as f:
        f.write(str(step))
    final = os.path.join(policy_dir, "latest")
    old = os.path.join(policy_dir, f".old-{step}")
    if os.path.exists(final):
        os.rename(final, old)
    os.rename(tmp, final)
    if os.path.exists(old):
        import shutil

        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------- driver side

def plan_steps(cfg, train_rows: int) -> tuple[int, int]:
    """(steps per epoch, total steps) from the store's train rows and the config."""
    world = max(1, cfg.train.workers)
    per_rank = train_rows // world
    steps_per_epoch = per_rank // (cfg.train.batch_size * cfg.train.grad_accum)
    if steps_per_epoch < 1:
        from .errors import ConfigError

        raise ConfigError([f"train.batch_size: {train_rows} training sequences cannot fill one step of "
                           f"{world} worker(s) × batch {cfg.train.batch_size} × grad_accum "
                           f"{cfg.train.grad_accum} — lower train.batch_size or add data"])
    total = steps_per_epoch * cfg.train.epochs
    if cfg.train.max_steps:
        total = min(total, cfg.train.max_steps) if cfg.train.epochs > 1 else cfg.train.max_steps
    return steps_per_epoch, total


def fit_student(cfg, store, vocab_size: int, *, label: str = "student", alpha: float | None = None, scheduler: str | None = None,
                namespace: str | None = None, policy_dir: str | None = None, policy_every: int = 0):
    """Run (or resume) one DDP training run; returns (ray.train.Result, total_steps)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    alpha = cfg.train.alpha if alpha is None else alpha
    shard_ids = store.shard_ids()
    train_rows = sum(s["rows"] for s in store.manifest()["inputs"]["shards"].values())
    steps_per_epoch, total = plan_steps(cfg, train_rows)
    # Targets are read only when the loss uses them; online and hard-label runs read the inputs.
    fmt = "inputs" if cfg.train.online or alpha == 0 else cfg.targets.format
    what = "inputs" if fmt == "inputs" else "targets"
    store_uri = store.uri
    schema = dataset_schema(what, cfg.targets.format, vocab_size)
    t = cfg.train
    resources = {"CPU": t.cpus_per_worker, **t.resources}
    if t.use_gpu:
        resources["GPU"] = 1
    output_dir = os.path.abspath(os.path.expanduser(cfg.run.output_dir)) \
        if "://" not in cfg.run.output_dir else cfg.run.output_dir
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"config": cfg.to_dict(), "alpha": alpha, "label": label, "format": fmt,
                           "total_steps": total, "steps_per_epoch": steps_per_epoch, "scheduler": scheduler,
                           "namespace": namespace, "policy_dir": policy_dir, "policy_every": policy_every,
                           "fault": _fault_from_env(), "audit_dir": os.environ.get("RAYDISTILL_AUDIT_DIR")},
        scaling_config=ScalingConfig(num_workers=t.workers, use_gpu=t.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=f"{cfg.run.name}-{label}", storage_path=f"{output_dir}/checkpoints",
                             failure_config=FailureConfig(max_failures=t.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
        datasets={"train": lambda: store_dataset(store_uri, shard_ids, schema, what,
                                                 readers=max(2, cfg.train.workers))},
    )
    return trainer.fit(), total


def read_final_state(result) -> dict:
    """step, history and the exported student dir of a finished run's last checkpoint."""
    if result.checkpoint is None:
        raise RuntimeError(f"training produced no checkpoint: {result.error}")
    with result.checkpoint.as_directory() as d:
        with open(os.path.join(d, "state.json")) as f:
            state = json.load(f)
    return state
