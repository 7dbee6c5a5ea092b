"""Teacher generation passes: the teacher writes the responses (sequence-level KD, rationales).

A generation pass is one more kind of teacher pass, in the same Ray Data actor pool shape as the
scoring pass (`teacher.actor_pool_rows`): one task per shard, each replica loads the teacher once
and, per shard, reads the prompts of its input rows (`input_ids[:first j with loss_mask[j] == 1]`,
the instruction-row contract of `raydistill.instruct`), applies `generate.prompt_template`, runs
`model.generate()` (KV cache, batches of `teacher.batch_size`, LEFT padding so every prompt ends at
the last column, greedy when `generate.temperature == 0`) and writes `num_return_sequences` rows
per prompt — prompt + response, `loss_mask` on the response (its EOS included) — as a NEW inputs
file. The driver then records it as the shard's inputs, with provenance:

    inputs.shards[<sid>] = {input, rows, checksum, bytes, source: "teacher_generated",
                            prompts: {input, rows, checksum, bytes},   # where the prompts came from
                            generate: {<generation params>}, teacher_rev, generation: k,
                            produced_at_step}

`generate.keep: teacher` replaces a shard's own inputs (same shard id); `both` adds a shard
`<sid>-gen` beside it. The scoring pass then scores these rows like any others (a replaced shard's
stale targets are invalidated), and training uses today's loss on them: CE on the generated tokens
plus token KD (alpha). Resumable: each shard is recorded as it lands, and a re-run skips every shard
already generated with the same parameters and teacher revision. Refresh `source: teacher` on a
generated shard re-generates it with the current teacher (`regenerate`, called by refresh.passes).

Generated rows: seq_id = GEN_SEQ_BASE + prompt_seq_id * num_return_sequences + r, so the prompt of
every row is recoverable (`prompt_seq_id`) and no generated id collides with a corpus id.
"""
from __future__ import annotations

import hashlib
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import faults
from .errors import CorruptShardError
from .log import log
from .teacher import TeacherReplica

GEN_SEQ_BASE = 1 << 40
SOURCE = "teacher_generated"


def generation_params(cfg) -> dict:
    """What defines a generation (what a resumable pass compares)."""
    g = cfg.generate
    return {"max_new_tokens": g.max_new_tokens, "temperature": g.temperature, "top_p": g.top_p,
            "num_return_sequences": g.num_return_sequences, "prompt_template": g.prompt_template,
            "seq_len": cfg.data.seq_len}


def prompt_seq_id(seq_id, num_return_sequences: int):
    """The seq_id of the dataset row whose prompt a generated row answers."""
    return (np.asarray(seq_id, dtype=np.int64) - GEN_SEQ_BASE) // num_return_sequences


def apply_template(tokenizer, prompt: list[int], template: str | None) -> list[int]:
    """The prompt as the teacher sees it: `template` with {prompt} = the decoded prompt, re-encoded."""
    if template is None:
        return list(prompt)
    text = template.format(prompt=tokenizer.decode(prompt))
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _head_rows(model) -> int:
    """Rows of the model's output layer (what its logits span; config.vocab_size if it has no such layer)."""
    head = model.get_output_embeddings()
    return int(head.weight.shape[0]) if head is not None else int(model.config.vocab_size)


def generate_batch(model, prompts: list[list[int]], *, pad_id: int, eos_id: int | None, max_new_tokens: int,
                   temperature: float = 0.0, top_p: float = 1.0, num_return_sequences: int = 1,
                   device: str = "cpu", vocab_size: int | None = None) -> list[list[int]]:
    """Responses of `model.generate` for a batch of prompts, LEFT-padded (every prompt ends at the last
    column, so the first new token of each row follows its own last token). Returns
    len(prompts) * num_return_sequences token lists (prompt i's at i*n .. i*n+n-1), each cut after
    its first EOS (kept: the student learns to stop). `vocab_size` (the run's W): ids >= W — padding
    rows of a head wider than W, which the student's head may not have — are suppressed (HF applies
    that before temperature and top_p, so sampling is over softmax(logits[..., :W]))."""
    import torch
    from transformers import GenerationConfig

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    sample = temperature > 0
    head = _head_rows(model) if vocab_size is not None else None  # None: any generate()-like model
    padding = list(range(vocab_size, head)) if head is not None and vocab_size < head else None
    gen = GenerationConfig(max_new_tokens=int(max_new_tokens), do_sample=sample,
                           temperature=float(temperature) if sample else None,
                           top_p=float(top_p) if sample else None, top_k=None if sample else None,
                           num_return_sequences=int(num_return_sequences), pad_token_id=pad_id,
                           eos_token_id=eos_id, suppress_tokens=padding, use_cache=True)
    with torch.inference_mode():
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=gen)
    responses = []
    for row in out[:, width:].tolist():
        if eos_id is not None and eos_id in row:
            row = row[: row.index(eos_id) + 1]
        responses.append(row)
    return responses


def generated_rows(prompts: list[list[int]], responses: list[list[int]], seq_ids, *, seq_len: int,
                   pad_id: int, num_return_sequences: int) -> dict:
    """Instruction rows (the contract's columns) of prompt + response, truncated to seq_len and
    right-padded; loss_mask on the response tokens. Also "truncated": rows whose prompt left no room."""
    n = len(responses)
    input_ids = np.full((n, seq_len), pad_id, dtype=np.int64)
    loss_mask = np.zeros((n, seq_len), dtype=np.uint8)
    length = np.zeros(n, dtype=np.int32)
    out_ids = np.zeros(n, dtype=np.int64)
    truncated = 0
    for k, resp in enumerate(responses):
        i, r = divmod(k, num_return_sequences)
        row = (prompts[i] + resp)[:seq_len]
        input_ids[k, :len(row)] = row
        loss_mask[k, len(prompts[i]):len(row)] = 1
        length[k] = len(row)
        truncated += len(prompts[i]) >= seq_len
        out_ids[k] = GEN_SEQ_BASE + int(seq_ids[i]) * num_return_sequences + r
    return {"seq_id": out_ids, "input_ids": input_ids, "loss_mask": loss_mask, "length": length,
            "truncated": truncated}


def rows_table(rows: dict, vocab_size: int, schema: pa.Schema) -> pa.Table:
    """An inputs file of instruction rows (the task's input `schema`: seq_id, input_ids, loss_mask, length)."""
    from .data import inputs_table

    return inputs_table(rows["seq_id"], rows["input_ids"], vocab_size, schema=schema,
                        extra={"loss_mask": rows["loss_mask"], "length": rows["length"][:, None]})


def read_prompts_file(store, rec: dict) -> pa.Table:
    """A prompts file by its record {input, checksum, rows}, checksum-verified (after `keep: teacher`
    the original inputs file is no shard's current input, so the store's reader has no record of it)."""
    path = store.full_path(rec["input"])
    try:
        with store.filesystem.open_input_file(path) as f:
            data = f.read_buffer()
    except FileNotFoundError:
        raise CorruptShardError(f"prompts file {path} is missing — restore it, or delete {store.uri} so "
                                "that the data phase rebuilds the inputs") from None
    digest = "sha256:" + hashlib.sha256(memoryview(data)).hexdigest()
    if rec.get("checksum") and digest != rec["checksum"]:
        raise CorruptShardError(f"prompts file {path}: checksum mismatch (expected {rec['checksum']}, found "
                                f"{digest}) — restore it, or delete {store.uri} to rebuild the inputs")
    return pq.read_table(pa.BufferReader(data))


class GenerateReplica(TeacherReplica):
    """One teacher replica of a generation pass: a TeacherReplica (same loading, placement and `map_batches`
    protocol, one shard task per batch) whose per-shard method generates instead of scoring."""

    def __init__(self, *, config: dict, vocab_size: int, store_uri: str, fault: dict | None = None):
        from .models import load_tokenizer

        super().__init__(config=config, targets={}, vocab_size=vocab_size, store_uri=store_uri, fault=fault)
        from .config import Config
        from .instruct import pad_id_of

        self.cfg = Config.from_dict(config, check_paths=False)
        t = self.cfg.teacher
        self.tokenizer = load_tokenizer(t.model, trust_remote_code=t.trust_remote_code, revision=t.revision)
        self.pad_id, self.eos_id = pad_id_of(self.tokenizer), self.tokenizer.eos_token_id

    def score_shard(self, shard_id: str, version: int, inputs: str, seed: int, policy_version: int) -> dict:
        """Generation `version` of shard `shard_id` from the prompts file `inputs` (the name is the
        pool's protocol; `policy_version` is unused: the teacher wrote these rows)."""
        return self.generate_shard(shard_id, inputs, version, seed)

    def generate_shard(self, shard_id: str, prompts_rel: str, generation: int, seed: int) -> dict:
        import torch

        from .instruct import prompt_ids

        start = time.perf_counter()
        self.scored += 1
        faults.at_teacher_shard(self.fault, "before_write", self.scored)
        g, seq_len = self.cfg.generate, self.cfg.data.seq_len
        table = read_prompts_file(self.store, planned_shards(self.cfg, self.store)[shard_id])
        prompts = [apply_template(self.tokenizer, prompt_ids(a, m), g.prompt_template)
                   for a, m in zip(table["input_ids"].to_pylist(), table["loss_mask"].to_pylist())]
        torch.manual_seed(seed)  # sampling draws from the global generator: one seed per shard task
        responses: list[list[int]] = []
        bs = self.cfg.teacher.batch_size
        for lo in range(0, len(prompts), bs):
            chunk = prompts[lo:lo + bs]
            room = seq_len - min(len(p) for p in chunk)  # tokens past seq_len would be cut anyway
            if room <= 0:
                responses += [[] for _ in range(len(chunk) * g.num_return_sequences)]
                continue
            responses += generate_batch(self.model, chunk, pad_id=self.pad_id, eos_id=self.eos_id,
                                        max_new_tokens=min(g.max_new_tokens, room), temperature=g.temperature,
                                        top_p=g.top_p, num_return_sequences=g.num_return_sequences,
                                        device=self.device, vocab_size=self.vocab_size)
        rows = generated_rows(prompts, responses, table["seq_id"].to_numpy(), seq_len=seq_len,
                              pad_id=self.pad_id, num_return_sequences=g.num_return_sequences)
        output = generated_path(shard_id, generation)
        written = self.store.write_file(output, rows_table(rows, self.vocab_size,
                                                               self.task.input_schema(self.vocab_size)))
        faults.at_teacher_shard(self.fault, "after_write", self.scored)
        return {"shard_id": shard_id, "input": output, "rows": written["rows"], "checksum": written["checksum"],
                "bytes": written["bytes"], "prompts": len(prompts), "truncated": rows["truncated"],
                "tokens": int(rows["loss_mask"].sum()), "seconds": time.perf_counter() - start}


# ---------------------------------------------------------------------------------------- driver


def generated_path(shard_id: str, generation: int) -> str:
    return f"inputs/generated/{shard_id}-g{int(generation)}.parquet"


def _prompts_record(rec: dict) -> dict:
    """Where a shard's prompts live: a generated shard's original prompts, else its own inputs."""
    src = rec.get("prompts") if rec.get("source") == SOURCE else rec
    return {k: src[k] for k in ("input", "rows", "checksum", "bytes") if k in src}


def planned_shards(cfg, store) -> dict[str, dict]:
    """{output shard id: prompts record} of every shard a generation pass writes for this config."""
    shards = store.manifest()["inputs"].get("shards") or {}
    if cfg.generate.keep == "teacher":
        return {sid: _prompts_record(rec) for sid, rec in sorted(shards.items())}
    return {f"{sid}-gen": _prompts_record(rec) for sid, rec in sorted(shards.items())
            if rec.get("source") != SOURCE}


def pending_generation(cfg, store, teacher_rev: str) -> list[str]:
    """Output shards not yet generated with these parameters by this teacher revision."""
    shards, params = store.manifest()["inputs"].get("shards") or {}, generation_params(cfg)
    return [sid for sid in planned_shards(cfg, store)
            if not (shards.get(sid, {}).get("source") == SOURCE and shards[sid].get("generate") == params
                    and shards[sid].get("teacher_rev") == teacher_rev)]


def _record_inputs(store, updates: dict[str, dict]) -> None:
    """Record (add or replace) some input shards, keeping every other one, the eval file and info."""
    m = store.manifest()["inputs"]
    shards = dict(m.get("shards") or {}, **updates)
    store.record_inputs(shards, m.get("eval"), m.get("info") or {}, eval_checksum=m.get("eval_checksum"))


def run_generation_pass(cfg, store, shard_ids: list[str], *, vocab_size: int, teacher_rev: str, step: int = -1,
                        metrics=None, record: bool = True, replicas: int | None = None) -> dict:
    """Generate `shard_ids` (output ids of `planned_shards`) with a Ray Data pool of teacher replicas.
    With `record`, each shard is recorded as the shard's inputs the moment it lands (resumable);
    returns stats with "inputs": {shard id: new inputs file} and "records": {shard id: record}."""
    from .teacher import actor_pool_rows, task_seed

    planned, params = planned_shards(cfg, store), generation_params(cfg)
    current = store.manifest()["inputs"].get("shards") or {}
    tasks = []
    for sid in shard_ids:
        k = int(current.get(sid, {}).get("generation", 0)) + 1
        tasks.append({"shard_id": sid, "version": k, "inputs": planned[sid]["input"],
                      "seed": task_seed(cfg.run.seed, sid, k), "policy_version": -1})
    stats = {"source": SOURCE, "step": step, "shards": 0, "rows": 0, "prompts": 0, "tokens": 0, "truncated": 0,
             "inputs": {}, "records": {}}
    start = time.perf_counter()
    if tasks:
        n = max(1, min(replicas or cfg.teacher.replicas, len(tasks)))
        kwargs = dict(config=cfg.to_dict(), store_uri=store.uri, vocab_size=vocab_size, fault=faults.teacher_fault())
        by_id = {t["shard_id"]: t for t in tasks}
        for row in actor_pool_rows(tasks, GenerateReplica, cfg.teacher, n, kwargs):
            sid = str(row["shard_id"])
            rec = {"input": str(row["input"]), "rows": int(row["rows"]), "checksum": str(row["checksum"]),
                   "bytes": int(row["bytes"]), "source": SOURCE, "prompts": planned[sid], "generate": params,
                   "teacher_rev": teacher_rev, "generation": by_id[sid]["version"], "produced_at_step": step}
            if record:
                _record_inputs(store, {sid: rec})
            stats["inputs"][sid], stats["records"][sid] = rec["input"], rec
            stats["shards"] += 1
            stats["rows"] += rec["rows"]
            for key in ("prompts", "tokens", "truncated"):
                stats[key] += int(row[key])
            if metrics is not None:
                metrics.teacher_rows(rec["rows"], SOURCE)
                metrics.teacher_tokens(int(row["tokens"]), SOURCE)
    seconds = time.perf_counter() - start
    if stats["truncated"]:
        log(f"generation pass: {stats['truncated']} prompt(s) fill data.seq_len={cfg.data.seq_len} and got no "
            "response — raise data.seq_len or shorten generate.prompt_template")
    return dict(stats, seconds=seconds, expected_shards=len(tasks), complete=stats["shards"] == len(tasks),
                tokens_per_s=stats["tokens"] / seconds if seconds else 0.0,
                rows_per_s=stats["rows"] / seconds if seconds else 0.0)


def generate_pending(cfg, store, info, metrics=None) -> dict | None:
    """Pipeline phase (before the scoring pass): generate every shard not yet generated for this config
    and teacher revision. A replaced shard's targets (scored from its previous inputs) are invalidated,
    so the scoring pass re-scores it."""
    if not cfg.generate.enabled:
        return None
    todo = pending_generation(cfg, store, info.teacher_rev)
    if not todo:
        return None
    log(f"generation pass over {len(todo)} shard(s) ({cfg.generate.num_return_sequences} response(s) per prompt)")
    stats = run_generation_pass(cfg, store, todo, vocab_size=info.vocab_size, teacher_rev=info.teacher_rev,
                                metrics=metrics)
    for sid in stats["inputs"]:
        if store.current(sid) is not None:
            store.invalidate(sid, "its inputs were re-generated by the teacher")
    return {k: v for k, v in stats.items() if k not in ("records", "inputs")}  # the report keeps the figures


def regenerate(cfg, store, shard_ids: list[str], *, vocab_size: int, teacher_rev: str, step: int) -> dict:
    """Refresh hook (`refresh.source: teacher`): re-generate the generated shards among `shard_ids` with
    the current teacher revision and record them; returns {"inputs": {sid: file}, stats...} for the
    scoring pass that follows (an empty "inputs" when none of them is generated)."""
    shards = store.manifest()["inputs"].get("shards") or {}
    ids = [sid for sid in shard_ids if shards.get(sid, {}).get("source") == SOURCE]
    if not ids:
        return {"inputs": {}, "shards": 0, "tokens": 0}
    stats = run_generation_pass(cfg, store, ids, vocab_size=vocab_size, teacher_rev=teacher_rev, step=step,
                                replicas=cfg.refresh.max_replicas)
    stats.pop("records")
    return stats
