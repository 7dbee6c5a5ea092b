"""Student training: Ray Train DDP over the soft-target store (or a live teacher, `train.online`).

Each rank reads its own slice of the store's rows: every epoch the shards are put in an order
drawn from (run.seed, epoch) and split into contiguous runs of rows, one per rank
(`shard_reader.epoch_slices`), read through a Ray Data dataset of shard ids whose map step reads
the manifest and loads that shard's *current* version, so refreshed shards are picked up and a
superseded version is never counted twice. Every rank has at least rows // world rows, so all run
the same number of steps; a shard skipped on one rank (a corrupt file) ends that epoch on every
rank together (`every_rank_has`), never a hang.

The driver (`fit_student`) turns the config into a `TrainPlan`; every worker runs a `Trainer`
over it, stage by stage: set-up (`Trainer.__init__`), targets for a batch (`targets_for`), the
loss step (`loss_step`: forward, loss, backward — the one place the loss is computed), the
optimizer step (`optimizer_step`), log and checkpoint (`log_and_checkpoint`). What differs
between tasks (which model class, which logits and labels) comes from `tasks.get_task(cfg)`.

`train.strategy` says how the student is spread over the workers (`sharding`): `ddp` (a whole
student per rank) or `fsdp` (torch FSDP2: parameters, gradients and optimizer state sharded).

Checkpoints are directories (full, unsharded state dicts under either strategy: `sharding`):

    model.safetensors     student weights (loaded without pickle)
    optimizer.pt          optimizer + LR-scheduler state (torch.load(weights_only=True)), and how the
                          optimizer state is keyed (`format`: by_index for ddp, by_name for fsdp)
    state.json            step, epoch, config, loss history, the result-changing settings
    student/              (final checkpoint only) save_pretrained of the student

A restarted worker group (worker died, `train.max_failures`) or a re-run of the same run name
resumes from the newest checkpoint at its step and skips the batches of the epoch already done.
A resume whose settings differ from the checkpoint's in one that changes the result (seed, loss,
alpha, total steps, target format, task) logs a warning naming them and records them in state.json.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import torch

from . import faults
from .log import log0
from .chunked_loss import TeacherHead, chunk_tokens_for, fused_distill_loss, fused_head_problem, use_fused
from .losses import ce_loss, distill_loss, temperature_at
from .tasks.base import Task
from .shard_reader import epoch_slices, store_dataset
from .sharding import (full_state, gradient_sync, load_full_state, local_share, optimizer_format,
                       prepare_student, save_pretrained)
from .store import parent_id
from .targets import decode, from_logits

if TYPE_CHECKING:
    from .refresh.client import RefreshSpec

READS = ("targets", "inputs")


@dataclass(frozen=True)
class TrainPlan:
    """What every worker trains (built on the driver by `fit_student`; crosses to the workers)."""
    config: dict                     # Config.to_dict(): workers rebuild the Config from it
    alpha: float                     # KD weight against CE (0: hard labels only)
    label: str                       # run label: log prefix, Ray Train run-name suffix, audit files
    reads: str                       # "targets": the store's soft targets; "inputs": input rows only
    total_steps: int                 # (the hard-label and online runs need no cached target)
    steps_per_epoch: int
    refresh: RefreshSpec | None = None  # rank 0 reports its steps to the refresh scheduler
    fault: dict | None = None        # faults.train_fault() (tests)
    audit_dir: str | None = None     # RAYDISTILL_AUDIT_DIR: seq_ids per rank and epoch (tests)
    vocab_size: int | None = None    # W (models.ModelInfo): the online teacher's logits are cut to it
    store_uri: str = ""              # where the rows are read from, and which shards: (id, rows) each
    shard_rows: tuple = ()           # (shard_reader.epoch_slices splits them over the ranks per epoch)
    schema: pa.Schema | None = None  # the columns read (dataset_schema)
    readers: int = 1                 # reader tasks per rank

    def __post_init__(self):
        assert self.reads in READS, self.reads
        assert self.total_steps >= 1 and self.steps_per_epoch >= 1, (self.total_steps, self.steps_per_epoch)

    def result_keys(self) -> dict:
        """The settings a resumed run must share with its checkpoint to give the same result."""
        c = self.config
        return {"run.seed": c["run"]["seed"], "train.loss": c["train"]["loss"], "train.alpha": self.alpha,
                "total_steps": self.total_steps, "targets.format": c["targets"]["format"],
                "task": c.get("task", "causal_lm")}


def config_changes(checkpoint_keys: dict, plan_keys: dict) -> dict:
    """{key: [checkpoint value, this run's value]} for every result-changing key that differs."""
    return {k: [checkpoint_keys[k], v] for k, v in plan_keys.items()
            if k in checkpoint_keys and checkpoint_keys[k] != v}


# ---------------------------------------------------------------- data

def dataset_schema(what: str, fmt: str, vocab_size: int, task=None) -> pa.Schema:
    """Columns the trainer reads: the task's input rows, or a shard of soft targets."""
    from .targets import arrow_schema

    assert what in READS, what
    if what == "inputs":
        from .tasks import get_task

        return (task or get_task(None)).input_schema(vocab_size)
    # A store of examples' shards also carry their loss_mask and length (targets.py, instruct.py).
    masked = task is not None and "loss_mask" in task.input_schema(vocab_size).names
    return arrow_schema(fmt, vocab_size, masked)


# ---------------------------------------------------------------- checkpoints

def save_checkpoint(path: str, model, weights: dict, optimizer_state: dict, scheduler, state: dict, *,
                    export_dir=None) -> None:
    """Rank 0 writes `sharding.full_state`'s dicts (gathered on every rank before: FSDP all-gathers)."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    save_file(_untie(weights), os.path.join(path, "model.safetensors"))
    torch.save({"optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
                "format": optimizer_format(model)}, os.path.join(path, "optimizer.pt"))
    with open(os.path.join(path, "state.json"), "w") as f:
        json.dump(state, f)
    if export_dir:
        save_pretrained(model, os.path.join(path, export_dir), weights)


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

    opt = torch.load(os.path.join(path, "optimizer.pt"), weights_only=True)
    written, now = opt.get("format", "by_index"), optimizer_format(model)
    if written != now:
        strategy = {"by_index": "ddp", "by_name": "fsdp"}
        raise ValueError(f"the checkpoint {path} was written with train.strategy={strategy[written]}, this run uses "
                         f"train.strategy={strategy[now]}: resume with train.strategy={strategy[written]}, or "
                         f"start afresh with a new run.name")
    load_full_state(model, optimizer, load_file(os.path.join(path, "model.safetensors")), opt["optimizer"])
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


class SeqIdAudit:
    """Optional record of the seq_ids each rank trained on, per epoch (RAYDISTILL_AUDIT_DIR):
    evidence that ranks see disjoint rows and no row twice in an epoch, refreshes included."""

    def __init__(self, directory: str | None, label: str, rank: int):
        self.directory, self.label, self.rank = directory, label, rank
        self.ids: list[np.ndarray] = []

    def add(self, batch: pa.Table) -> None:
        if self.directory:
            self.ids.append(batch.column("seq_id").to_numpy())

    def record(self, name: str, value) -> None:
        """A JSON fact of this rank (e.g. the parameter elements it holds under FSDP)."""
        if self.directory:
            os.makedirs(self.directory, exist_ok=True)
            with open(os.path.join(self.directory, f"{self.label}-rank{self.rank}-{name}.json"), "w") as f:
                json.dump(value, f)

    def close_epoch(self, epoch: int) -> None:
        if self.directory and self.ids:
            os.makedirs(self.directory, exist_ok=True)
            path = os.path.join(self.directory, f"{self.label}-rank{self.rank}-epoch{epoch}-{time.time_ns()}.npy")
            np.save(path, np.concatenate(self.ids))
        self.ids = []


def _clone_targets(targets):
    """Tensors made under inference_mode can't enter autograd graphs; clone them out of it."""
    return replace(targets, logprobs=targets.logprobs.clone(),
                   label_logprob=None if targets.label_logprob is None else targets.label_logprob.clone())


# ---------------------------------------------------------------- the trainer (runs on every worker)

def train_loop(loop_config: dict) -> None:
    """What each Ray Train worker runs: `{"plan": TrainPlan}` from `fit_student`."""
    Trainer(loop_config["plan"]).run()


class Trainer:
    """One worker's part of a training run; `run` is the loop, each stage one method."""

    def __init__(self, plan: TrainPlan):
        """Set-up: config, task, student (DDP-wrapped), optimizer, online teacher, resume."""
        import ray.train
        import ray.train.torch

        from .config import Config, warmup_steps_for
        from .metrics import RunMetrics
        from .tasks import get_task

        self.plan = plan
        self.cfg = cfg = Config.from_dict(plan.config, check_paths=False)
        self.task, t = get_task(cfg), cfg.train
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        torch.set_num_threads(max(1, int(t.cpus_per_worker)))
        torch.manual_seed(cfg.run.seed)
        self.device = ray.train.torch.get_device()
        # bf16 autocast on GPUs, and on CPUs with bf16 kernels when student.dtype asks for it;
        # weights, optimizer and loss stay float32.
        self.amp = self.device.type == "cuda" or (cfg.student.dtype == "bfloat16" and self.device.type == "cpu"
                                                  and torch.ops.mkldnn._is_mkldnn_bf16_supported())
        student = self.task.build_student(seed=cfg.run.seed)
        if t.gradient_checkpointing:
            student.gradient_checkpointing_enable()  # activations recomputed per layer in backward
        self.model = prepare_student(student, t.strategy, self.world, plan.label)
        self.fused = None  # decided on the first batch (chunked_loss.use_fused needs its size)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
        warmup = warmup_steps_for(t, plan.total_steps)
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(warmup, plan.total_steps))
        self.teacher = None
        if t.online:  # the baseline: the teacher's forward runs inside every student step
            tc = cfg.teacher
            self.teacher = self.task.load_model(tc.model, dtype=tc.dtype, trust_remote_code=tc.trust_remote_code,
                                                allow_pickle_weights=tc.allow_pickle_weights,
                                                revision=tc.revision).to(self.device)
        self.step, self.history, self.resumed_from, self.config_changes = 0, [], None, {}
        self._resume()
        self.metrics = RunMetrics(cfg.run.name) if self.rank == 0 else None
        self.refresh = None
        if plan.refresh is not None and self.rank == 0:
            from .refresh.client import RefreshClient

            self.refresh = RefreshClient(plan.refresh)
        self.audit = SeqIdAudit(plan.audit_dir, plan.label, self.rank)
        self.audit.record("params", dict(zip(("local", "total"), local_share(self.model)), strategy=t.strategy))
        self.start = self.last_log = time.perf_counter()
        self.tokens_since = 0

    def _resume(self) -> None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if not checkpoint:
            return
        with checkpoint.as_directory() as d:
            state = load_checkpoint(d, self.model, self.optimizer, self.lr_schedule)
        label = self.plan.label
        self.step, self.history, self.resumed_from = state["step"], state["history"], state["step"]
        log0(f"[{label}] resumed from checkpoint at step {self.step}")
        changed = config_changes(state.get("result_keys", {}), self.plan.result_keys())
        self.config_changes = {**state.get("config_changes", {}), **changed}
        if changed:
            what = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items())
            log0(f"[{label}] the checkpoint at step {self.step} was written with other settings: {what} — "
                 f"the result will differ from one uninterrupted run; use a new run.name to start afresh",
                 warning=True)

    def run(self) -> None:
        p, t = self.plan, self.cfg.train
        batches_per_epoch = p.steps_per_epoch * t.grad_accum
        epoch = self.step // p.steps_per_epoch
        skip = (self.step % p.steps_per_epoch) * t.grad_accum  # after a resume: batches of this epoch done
        while self.step < p.total_steps:
            micro, ran = 0, False
            batches = self.epoch_batches(epoch)
            try:
                for i in range(batches_per_epoch):
                    # The batches after the epoch's last whole step are not read (with grad_accum > 1
                    # their gradients would leak into the next epoch's first step).
                    batch = next(batches, None)
                    if not self.every_rank_has(batch is not None) or self.step >= p.total_steps:
                        break
                    if i < skip:
                        continue
                    ran = True
                    self.audit.add(batch)
                    inputs, targets = self.targets_for(batch)
                    sync = (micro + 1) % t.grad_accum == 0
                    if sync and self.refresh is not None:
                        # Before this backward's all-reduce: while rank 0 waits, the others wait in it.
                        self.refresh.before_step(self.step + 1)
                    temperature = self.temperature()
                    loss, parts = self.loss_step(inputs, targets, temperature, sync=sync)
                    micro += 1
                    self.tokens_since += inputs["input_ids"].numel() * self.world
                    if not sync:
                        continue
                    self.optimizer_step()
                    if self.refresh is not None:
                        self.refresh.after_step(self.step, unwrap(self.model))
                    self.log_and_checkpoint(loss, parts, temperature)
            finally:
                batches.close()  # stops this epoch's reader tasks when the epoch ends early
            self.audit.close_epoch(epoch)
            if not ran and skip == 0:
                raise RuntimeError(f"[{p.label}] the training split of rank {self.rank} is empty: the store has "
                                   f"fewer rows than train.workers × train.batch_size")
            epoch, skip = epoch + 1, 0  # a short epoch (a skipped shard) is not re-run from its middle

    def epoch_batches(self, epoch: int):
        """This rank's batches of one epoch, from the shards' current versions."""
        p = self.plan
        mine = epoch_slices(list(p.shard_rows), self.world, self.cfg.run.seed, epoch)[self.rank]
        ds = store_dataset(p.store_uri, mine, p.schema, p.reads, readers=p.readers)
        for batch in ds.iter_batches(batch_size=self.cfg.train.batch_size, batch_format="pyarrow", drop_last=True):
            yield batch

    def every_rank_has(self, has_batch: bool) -> bool:
        """Whether every rank has its next batch: one short rank (a shard skipped) stops them all."""
        if self.world == 1:
            return has_batch
        flag = torch.tensor([int(has_batch)], device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        return bool(flag.item())

    def targets_for(self, batch: pa.Table):
        """(model inputs on the device, soft targets or None): targets from the store's shard, or
        the online teacher's logits (with the fused loss: its hidden states + head, `TeacherHead`),
        or none at all when only hard labels are trained on."""
        inputs = {k: v.to(self.device) for k, v in self.task.inputs_from_arrow(batch).items()}
        if self.teacher is not None and self._fused(inputs, self.task.labels(inputs)) and self.teacher_head:
            # The fused loss makes the teacher's logits chunk by chunk too: keep its hidden states + head.
            with torch.no_grad():
                hidden, weight, bias = self.task.hidden_states(self.teacher, inputs)
            return inputs, TeacherHead.cut(hidden, weight, bias, self.plan.vocab_size)
        if self.teacher is not None:
            with torch.inference_mode():
                logits = self.task.logits(self.teacher, inputs)[..., :self.plan.vocab_size]  # ids >= W: padding
                targets = from_logits(logits.float(), self.task.labels(inputs))
            return inputs, _clone_targets(targets)
        if self.plan.reads == "inputs":
            return inputs, None
        return inputs, decode(batch, self.cfg.targets.format)[1].to(self.device)

    def temperature(self) -> float:
        s, t = self.cfg.train.temperature_schedule, self.cfg.train.temperature
        return temperature_at(s.kind, _or(s.start, t), _or(s.end, t), self.step, self.plan.total_steps)

    def loss_step(self, inputs: dict, targets, temperature: float, *, sync: bool):
        """Forward, loss and backward of one micro-batch -> (loss, {"kd": float, "ce": float}).

        The one place the loss is computed (a chunked loss for large vocabularies replaces the
        logits + loss lines). Gradients are all-reduced only on the micro-batch that completes a step."""
        t, model = self.cfg.train, self.model
        labels = self.task.labels(inputs)
        with gradient_sync(model, sync):
            if self._fused(inputs, labels):
                # LM head + loss chunk by chunk: the same value and gradients, no [B, P, V] logits.
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                    hidden, weight, bias = self.task.hidden_states(model, inputs)
                    loss, parts = fused_distill_loss(
                        hidden, weight, targets, labels, bias=bias, alpha=self.plan.alpha if targets is not None
                        else 0.0, temperature=temperature, loss=t.loss, jsd_beta=t.jsd_beta,
                        chunk_tokens=t.loss_chunk_tokens)
                (loss / t.grad_accum).backward()
                return loss, parts
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                logits = self.task.logits(model, inputs)
            if targets is None:
                loss = ce_loss(logits, labels)
                parts = {"kd": 0.0, "ce": loss.item()}
            else:
                loss, parts = distill_loss(logits, targets, labels, alpha=self.plan.alpha, temperature=temperature,
                                           loss=t.loss, jsd_beta=t.jsd_beta)
            (loss / t.grad_accum).backward()
        return loss, parts

    def _fused(self, inputs: dict, labels) -> bool:
        """Whether this run takes the fused head + loss (train.fused_loss; auto: the logits exceed a chunk)."""
        if self.fused is None:
            t = self.cfg.train
            vocab = unwrap(self.model).config.vocab_size
            self.fused = (self.task.hidden_states.__func__ is not Task.hidden_states
                          and use_fused(t.fused_loss, labels.numel(), vocab, t.loss_chunk_tokens))
            # Online: the teacher's head joins the chunks unless it transforms its logits (then its
            # full logits are the targets, as without the fused loss).
            problem = fused_head_problem(self.teacher) if self.fused and self.teacher is not None else None
            self.teacher_head = self.fused and self.teacher is not None and problem is None
            how = f"fused LM head + loss, chunks of {chunk_tokens_for(vocab, t.loss_chunk_tokens)} tokens"
            if self.teacher_head:
                how += "; the online teacher's head in the same chunks"
            elif self.fused and problem:
                how += f"; the online teacher's full logits ({type(unwrap(self.teacher)).__name__} {problem})"
            log0(f"[{self.plan.label}] loss: {how if self.fused else 'full logits'}")
        return self.fused

    def optimizer_step(self) -> None:
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip)
        self.optimizer.step()
        self.lr_schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        faults.at_train_step(self.plan.fault, self.step, self.rank)

    def log_and_checkpoint(self, loss, parts: dict, temperature: float) -> None:
        t, step, total, label = self.cfg.train, self.step, self.plan.total_steps, self.plan.label
        if step % t.log_every == 0 or step == total:
            now = time.perf_counter()
            tps = self.tokens_since / max(now - self.last_log, 1e-9)
            eta = (now - self.start) / max(step - (self.resumed_from or 0), 1) * (total - step)
            self.history.append({"step": step, "loss": float(loss), "kd": parts["kd"], "ce": parts["ce"],
                                 "tokens_per_s": tps, "temperature": temperature})
            log0(f"[{label}] step {step}/{total} loss {float(loss):.4f} kd {parts['kd']:.4f} "
                 f"ce {parts['ce']:.4f} {tps:,.0f} tok/s ETA {eta:.0f}s")
            if self.metrics is not None:
                self.metrics.train_step(float(loss), tps, step)
            self.last_log, self.tokens_since = now, 0
        if step % t.checkpoint_every == 0 or step == total:
            self._report(final=step == total)

    def _report(self, *, final: bool) -> None:
        """Every rank reports (Ray Train needs the same number of reports); rank 0 adds the checkpoint."""
        import ray.train

        metrics = {"step": self.step, "loss": self.history[-1]["loss"] if self.history else float("nan"),
                   "resumed_from_step": -1 if self.resumed_from is None else self.resumed_from}
        weights, optimizer_state = full_state(self.model, self.optimizer, self.rank)  # FSDP: every rank gathers
        if self.rank != 0:
            ray.train.report(metrics, checkpoint=None)
            return
        state = {"step": self.step, "history": self.history, "config": self.plan.config,
                 "resumed_from": self.resumed_from, "result_keys": self.plan.result_keys(),
                 "config_changes": self.config_changes, "strategy": self.cfg.train.strategy}
        with tempfile.TemporaryDirectory() as d:
            save_checkpoint(d, self.model, weights, optimizer_state, self.lr_schedule, state,
                            export_dir="student" if final else None)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def _or(value, default):
    return default if value is None else value


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


def fit_student(cfg, store, vocab_size: int, *, label: str = "student", alpha: float | None = None,
                refresh: RefreshSpec | None = None):
    """Run (or resume) one DDP training run; returns (ray.train.Result, total_steps).

    `refresh`: how rank 0 reaches the refresh scheduler (`refresh.fit_kwargs`; None: no refresh)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig

    from .cluster import output_dir
    from .tasks import get_task
    from .torch_trainer import DistillTrainer

    alpha = cfg.train.alpha if alpha is None else alpha
    inputs = store.manifest()["inputs"]["shards"]
    shard_rows = [(sid, inputs[parent_id(sid)]["rows"]) for sid in store.shard_ids()]  # a component: its shard's rows
    steps_per_epoch, total = plan_steps(cfg, sum(n for _, n in shard_rows))
    # Targets are read only when the loss uses them; online and hard-label runs read the inputs.
    reads = "inputs" if cfg.train.online or alpha == 0 else "targets"
    t = cfg.train
    plan = TrainPlan(config=cfg.to_dict(), alpha=alpha, label=label, reads=reads, total_steps=total,
                     steps_per_epoch=steps_per_epoch, refresh=refresh, fault=faults.train_fault(),
                     audit_dir=os.environ.get("RAYDISTILL_AUDIT_DIR"), vocab_size=vocab_size,
                     store_uri=store.uri, shard_rows=tuple(shard_rows),
                     schema=dataset_schema(reads, cfg.targets.format, vocab_size, get_task(cfg)),
                     readers=max(1, 2 // max(1, t.workers)))  # 2 reader tasks in all for 1-2 workers
    resources = {"CPU": t.cpus_per_worker, **t.resources}
    if t.use_gpu:
        resources["GPU"] = 1
    trainer = DistillTrainer(
        train_loop,
        train_loop_config={"plan": plan},
        scaling_config=ScalingConfig(num_workers=t.workers, use_gpu=t.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=f"{cfg.run.name}-{label}", storage_path=f"{output_dir(cfg)}/checkpoints",
                             failure_config=FailureConfig(max_failures=t.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
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
