"""Teacher passes: teacher replicas in a Ray Data actor pool score shards into the store.

A pass is a dataset of *shard tasks* (one row per shard: id, version to write, inputs file,
seed). Each replica loads the teacher once, scores a task's sequences in micro-batches of
`teacher.batch_size`, encodes the soft targets and writes the shard version file itself
(atomic temp + rename, so a killed replica leaves no partial file); only a small record comes back.
The driver (or the refresh scheduler) commits each record to the manifest as it streams in,
so an interrupted pass keeps every shard it finished and a re-run scores only the rest.
"""
from __future__ import annotations

import hashlib
import os
import time
from collections import defaultdict

import numpy as np
import pyarrow as pa
import torch

from . import faults
from .models import DTYPES
from .store import SoftTargetStore
from .targets import SCHEMA_VERSION, build_table
from .tasks.base import int_matrix


def target_params(targets_cfg) -> dict:
    """The format and the parameters that define it (what a resumable pass compares). `schema`
    numbers the shard layout (targets.SCHEMA_VERSION): a store written with another is not reused."""
    if targets_cfg.format == "topk":
        return {"format": "topk", "k": targets_cfg.k, "capture_temperature": targets_cfg.capture_temperature,
                "schema": SCHEMA_VERSION}
    if targets_cfg.format == "dense":
        return {"format": "dense", "capture_temperature": targets_cfg.capture_temperature}
    return {"format": "sampled", "samples": targets_cfg.samples,
            "capture_temperature": targets_cfg.capture_temperature, "schema": SCHEMA_VERSION}


# The name the refresh code and tests know the task seam's int-matrix helper by.
list_column_to_numpy = int_matrix


class TeacherReplica:
    """One teacher replica: a `map_batches` callable class hosted by a Ray Data actor (or a plain
    actor of the refresh pool). The run's task loads the model and turns input rows into targets."""

    def __init__(self, *, config: dict, targets: dict, vocab_size: int, store_uri: str, fault: dict | None = None):
        from .config import Config
        from .tasks import get_task

        cfg = Config.from_dict(config, check_paths=False)
        t = cfg.teacher
        torch.set_num_threads(max(1, int(t.cpus_per_replica)))
        self.fault, self.scored = fault, 0  # test hook (faults.teacher_fault)
        self.task = get_task(cfg)
        self.device = "cuda" if t.gpus_per_replica > 0 and torch.cuda.is_available() else "cpu"
        # A replica that needs several GPUs spreads its layers over them with accelerate.
        device_map = "auto" if t.gpus_per_replica > 1 else None
        self.model = self.task.load_model(os.path.expanduser(t.model), dtype=t.dtype,
                                          trust_remote_code=t.trust_remote_code,
                                          allow_pickle_weights=t.allow_pickle_weights, revision=t.revision,
                                          device_map=device_map)
        if device_map is None:
            self.model.to(self.device)
        self.autocast = self.device == "cuda" and DTYPES[t.dtype] != torch.float32
        self.dtype = DTYPES[t.dtype]
        self.targets = targets
        self.vocab_size = vocab_size
        self.store = SoftTargetStore(store_uri)
        self.batch_size = t.batch_size

    def __call__(self, batch: dict) -> dict:
        out = defaultdict(list)
        for i in range(len(batch["shard_id"])):
            res = self.score_shard(str(batch["shard_id"][i]), int(batch["version"][i]),
                                   str(batch["inputs"][i]), int(batch["seed"][i]),
                                   int(batch["policy_version"][i]))
            for k, v in res.items():
                out[k].append(v)
        return {k: np.asarray(v) for k, v in out.items()}

    def encode(self, rows: pa.Table, generator: torch.Generator) -> dict:
        """Soft-target columns of some input rows ({column: one array per row})."""
        inputs = {k: v.to(self.device) for k, v in self.task.inputs_from_arrow(rows).items()}
        with torch.inference_mode(), torch.autocast(self.device, dtype=self.dtype, enabled=self.autocast):
            return self.task.encode_targets(self.model, inputs, params=self.targets, vocab_size=self.vocab_size,
                                            generator=generator)

    def score_shard(self, shard_id: str, version: int, inputs: str, seed: int, policy_version: int) -> dict:
        start = time.perf_counter()
        self.scored += 1
        faults.at_teacher_shard(self.fault, "before_write", self.scored)
        table = self.store.read_input_file(inputs)  # checksum-verified: damaged inputs are never scored
        generator = torch.Generator(device=self.device).manual_seed(seed)
        columns = defaultdict(list)
        for lo in range(0, table.num_rows, self.batch_size):
            for k, v in self.encode(table.slice(lo, self.batch_size), generator).items():
                columns[k].extend(v)
        ids = int_matrix(table["input_ids"])
        shard = build_table(columns, seq_id=table["seq_id"].to_numpy(), input_ids=ids,
                            policy_version=policy_version, fmt=self.targets["format"], vocab_size=self.vocab_size)
        written = self.store.write_shard(shard_id, version, shard)
        faults.at_teacher_shard(self.fault, "after_write", self.scored)
        return {"shard_id": shard_id, "version": version, "rows": written["rows"],
                "checksum": written["checksum"], "bytes": written["bytes"], "tokens": int(ids.size),
                "seconds": time.perf_counter() - start, "policy_version": policy_version}


def task_seed(seed: int, shard_id: str, version: int) -> int:
    digest = hashlib.sha256(f"{seed}:{shard_id}:{version}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def run_teacher_pass(cfg, store: SoftTargetStore, shard_ids: list[str], *, vocab_size: int, teacher_rev: str,
                     step: int = -1, source: str = "initial", seed: int = 0, inputs: dict | None = None,
                     policy_version: int = -1, max_replicas: int | None = None, metrics=None,
                     on_commit=None, pool: "TeacherPool | None" = None, teacher: str | None = None) -> dict:
    """Score `shard_ids` with teacher replicas and commit each new version as it lands: a Ray Data
    actor pool started for this pass, or `pool`'s long-lived replicas (refresh passes). `teacher`:
    the name of one of several teachers (`cfg.teacher` is then that teacher: teachers.for_teacher),
    recorded in every version it commits."""
    params = target_params(cfg.targets)
    stats = {"source": source, "step": step, "shards": 0, "rows": 0, "tokens": 0, "bytes": 0}
    start = time.perf_counter()
    if not shard_ids:
        return dict(stats, seconds=0.0, rows_per_s=0.0, tokens_per_s=0.0)
    manifest_inputs = store.manifest()["inputs"]["shards"]
    tasks = []
    for sid in shard_ids:
        version = store.next_version(sid)
        tasks.append({"shard_id": sid, "version": version, "seed": task_seed(seed, sid, version),
                      "inputs": (inputs or {}).get(sid) or manifest_inputs[sid]["input"],
                      "policy_version": policy_version})
    replicas = max(1, min(cfg.teacher.replicas, max_replicas or cfg.teacher.replicas, len(tasks)))
    if pool is not None:
        replicas, rows = pool.size, pool.score(tasks)
    else:
        rows = _ray_data_rows(cfg, store, tasks, replicas, params, vocab_size)
    for row in rows:
        record = {"rows": int(row["rows"]), "checksum": str(row["checksum"]), "bytes": int(row["bytes"]),
                  "teacher_rev": teacher_rev, "format": params["format"],
                  "params": {k: v for k, v in params.items() if k != "format"},
                  "produced_at_step": step, "policy_version": int(row["policy_version"]), "source": source}
        if teacher is not None:
            record["teacher"] = teacher
        store.commit(str(row["shard_id"]), int(row["version"]), record)
        stats["shards"] += 1
        stats["rows"] += record["rows"]
        stats["tokens"] += int(row["tokens"])
        stats["bytes"] += record["bytes"]
        if metrics is not None:
            metrics.teacher_rows(record["rows"], source)
            metrics.teacher_tokens(int(row["tokens"]), source)
        if on_commit is not None:
            on_commit(str(row["shard_id"]), record)
    seconds = time.perf_counter() - start
    if teacher is not None:
        stats["teacher"] = teacher
    return dict(stats, seconds=seconds, rows_per_s=stats["rows"] / seconds,
                tokens_per_s=stats["tokens"] / seconds, replicas=replicas,
                expected_shards=len(tasks), complete=stats["shards"] == len(tasks))


def _replica_kwargs(cfg, params: dict, vocab_size: int, store: SoftTargetStore) -> dict:
    return dict(config=cfg.to_dict(), targets=params, vocab_size=vocab_size, store_uri=store.uri,
                fault=faults.teacher_fault())


def _ray_data_rows(cfg, store, tasks: list[dict], replicas: int, params: dict, vocab_size: int):
    """One row per scored shard, from a Ray Data actor pool that lives as long as this pass."""
    return actor_pool_rows(tasks, TeacherReplica, cfg.teacher, replicas,
                           _replica_kwargs(cfg, params, vocab_size, store))


def actor_pool_rows(tasks: list[dict], replica_cls, teacher_cfg, replicas: int, constructor_kwargs: dict):
    """One output row per task (one task per batch), from a Ray Data actor pool of `replica_cls` placed
    like teacher replicas, living as long as the iteration: scoring and generation passes alike.
    A replica that dies is restarted by Ray Data and its task retried."""
    import ray.data

    from .cluster import teacher_options

    ds = ray.data.from_items(tasks, override_num_blocks=len(tasks)).map_batches(
        replica_cls, batch_size=1, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=replicas), **teacher_options(teacher_cfg),
        fn_constructor_kwargs=constructor_kwargs)
    return ds.iter_rows()
