"""On-policy refresh inputs: the latest student continues each shard's corpus prompts.

Train rank 0 saves the student at `<output_dir>/policy/latest` (`client.save_policy`); a refresh
pass with `refresh.source: on_policy` loads it in Ray tasks placed like teacher replicas, keeps the
first half of each sequence as the prompt and samples the rest (`generation.sample`, temperature 1).
The continuations go to `inputs/policy/<shard>-<step>.parquet` (same seq_ids), the teacher scores
them, and their rows carry `policy_version` = the student's step. `output_dir` must be shared
storage on a multi-node cluster (workers write the policy, tasks read it).
"""
from __future__ import annotations

import os
import time

from ..cluster import output_dir


def policy_path(cfg) -> str:
    return f"{output_dir(cfg).rstrip('/')}/policy"


def _load_policy(cfg, policy_dir: str | None):
    """(model, step) of the latest student saved by rank 0; the initial student (step 0) if none yet."""
    from ..models import build_student, load_causal_lm

    latest = os.path.join(policy_dir, "latest") if policy_dir else None
    for _ in range(10):  # rank 0 swaps `latest` by two renames: retry through that short window
        if not (latest and os.path.isdir(latest)):
            break
        try:
            with open(os.path.join(latest, "step.txt")) as f:
                step = int(f.read())
            model = load_causal_lm(latest, key="policy")
            with open(os.path.join(latest, "step.txt")) as f:
                if int(f.read()) == step:
                    return model, step
        except Exception:  # half-renamed directory, partial write: try again
            pass
        time.sleep(0.2)
    model = build_student(cfg.student, cfg.teacher.model, trust_remote_code=cfg.teacher.trust_remote_code,
                          seed=cfg.run.seed)
    return model.eval(), 0


def _generate_task(cfg_dict: dict, store_uri: str, shard_ids: list[str], policy_dir: str | None,
                   step: int, vocab_size: int) -> dict:
    """Ray task: the latest student continues each shard's prompts; writes one inputs file per shard."""
    import torch

    from ..config import Config
    from ..data import inputs_table
    from ..generation import sample
    from ..store import SoftTargetStore
    from ..teacher import list_column_to_numpy, task_seed

    cfg = Config.from_dict(cfg_dict, check_paths=False)
    torch.set_num_threads(max(1, int(cfg.teacher.cpus_per_replica)))
    device = "cuda" if cfg.teacher.gpus_per_replica > 0 and torch.cuda.is_available() else "cpu"
    store = SoftTargetStore(store_uri)
    model, policy_step = _load_policy(cfg, policy_dir)
    model.to(device)
    out, tokens = {}, 0
    for sid in shard_ids:
        table = store.read_input(sid)
        ids = torch.from_numpy(list_column_to_numpy(table["input_ids"]))
        L = ids.shape[1]
        P = max(1, L // 2)
        gen = torch.Generator(device=device).manual_seed(task_seed(cfg.refresh.seed, sid, step))
        parts = []
        for lo in range(0, len(ids), cfg.teacher.batch_size):
            x = ids[lo:lo + cfg.teacher.batch_size, :P].to(device)
            parts.append(sample(model, x, L - P, gen, vocab_size=vocab_size).cpu())  # ids < W only
        new = torch.cat(parts).numpy()
        tokens += int((L - P) * len(new))
        rel = f"inputs/policy/{sid}-{int(step)}.parquet"
        store.write_file(rel, inputs_table(table["seq_id"].to_numpy(), new, vocab_size))
        out[sid] = rel
    return {"inputs": out, "policy_version": int(policy_step), "tokens": tokens}


def generate_policy_inputs(cfg, store, shard_ids: list[str], policy_dir: str | None, *, step: int,
                           vocab_size: int) -> dict:
    """On-policy inputs for `shard_ids`, generated in Ray tasks sized like teacher replicas (at most
    `refresh.max_replicas` at once). Returns {"inputs": {sid: rel path}, "policy_version", "tokens"}."""
    import ray

    from ..cluster import teacher_options

    task = ray.remote(_generate_task).options(**teacher_options(cfg.teacher), max_retries=2)
    n = max(1, min(cfg.refresh.max_replicas, len(shard_ids)))
    groups = [shard_ids[i::n] for i in range(n)]
    cfg_dict = cfg.to_dict()
    results = ray.get([task.remote(cfg_dict, store.uri, g, policy_dir, step, vocab_size) for g in groups if g])
    inputs = {k: v for res in results for k, v in res["inputs"].items()}
    return {"inputs": inputs, "policy_version": min(r["policy_version"] for r in results),
            "tokens": sum(r["tokens"] for r in results)}


def prune_policy_inputs(store, shard_ids: list[str], keep: int = 2) -> None:
    """Delete all but the newest `keep` generated inputs files of each shard (the scored rows are
    in the shard versions; the inputs files are only read while a pass scores them)."""
    import pyarrow.fs as pafs

    try:
        infos = store.filesystem.get_file_info(
            pafs.FileSelector(store.full_path("inputs/policy"), allow_not_found=True))
    except OSError:
        return
    by_shard: dict[str, list[tuple[int, str]]] = {}
    for info in infos:
        name = info.path.rsplit("/", 1)[-1]
        if not name.endswith(".parquet") or "-" not in name:
            continue
        sid, _, rest = name[:-len(".parquet")].rpartition("-")
        if sid in shard_ids and rest.lstrip("-").isdigit():
            by_shard.setdefault(sid, []).append((int(rest), info.path))
    for files in by_shard.values():
        for _, path in sorted(files)[:-keep]:
            try:
                store.filesystem.delete_file(path)
            except OSError:
                pass
