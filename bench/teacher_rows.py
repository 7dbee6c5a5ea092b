"""Rows 1 and 2: the teacher pass against a plain single-process loop, and replica scaling.

Row 1  pipeline = `raydistill.data.build_inputs` + `raydistill.pipeline.score_pending` on a fresh
       store (Ray Data read → tokenize + pack → teacher actors: forward → encode → Parquet write →
       driver commit), tokens/s over its whole wall time. Baseline = one process looping over the very
       token batches the pass scored (read back from the store's input shards) with the same model
       forward + `targets.encode`, nothing else, with torch threads = cores and with 1 thread: the
       faster is the raw limit (on a busy shared machine 2 OpenMP threads can lose to 1).
Row 2  re-score every shard with 1, 2 and N (= cores) replicas (`run_teacher_pass`, one CPU and one
       torch thread per replica; row 1's pass is the N run): tokens/s of the whole pass (actor
       start-up and model load included, as a user sees it); beside it the rate after the first
       commit (which still includes the start-up of the replicas that commit later).

Row 1b the input build alone (`build_inputs` on a fresh store: read, tokenize + pack, the shards'
       Parquet files and the manifest) against a plain script doing the same work with no store:
       pyarrow read, a fresh tokenizer load, `tokenize_and_pack` per batch, `pq.write_table` per
       shard. Interleaved A B A B (`sizes.fixed_repeats` pairs), median ratio plain / build; each
       build starts with no cached tokenizer, as a fresh run does. Target: <= 3 s at this size.
Row 1c the same build through the Ray Data reader (what corpora above `data.IN_PROCESS_MAX_BYTES`
       use, and every corpus used before) against the driver reader, one A B pair, the same rows.

Breakdown (the profile of where the pass's time goes): the same stages timed in-process on the same
sequences (tokenize, forward, encode, build_table + write_shard), and the pass's first-commit
latency (actor start + model load + first shard).
"""
from __future__ import annotations

import os
import shutil
import time

import numpy as np

from common import Row, Timer, bench_config, cores, judge, log, median


def _input_batches(store, batch_size: int) -> list[np.ndarray]:
    from raydistill.teacher import list_column_to_numpy

    out = []
    for sid in store.shard_ids():
        ids = list_column_to_numpy(store.read_input(sid)["input_ids"])
        out += [ids[lo:lo + batch_size] for lo in range(0, len(ids), batch_size)]
    return out


def timed_forward_encode(model, batch: np.ndarray, *, samples: int, vocab_size: int, generator) -> tuple:
    """(encoded columns, forward s, encode s) of one batch: the teacher pass's work, timed."""
    import torch

    from raydistill.targets import encode

    x = torch.from_numpy(batch)
    t = Timer()
    with torch.inference_mode():
        logits = model(input_ids=x).logits
    fwd = t()
    t = Timer()
    encoded = encode(logits, x, fmt="sampled", samples=samples, capture_temperature=1.0, vocab_size=vocab_size,
                     generator=generator)
    return encoded, fwd, t()


def plain_teacher_loop(teacher_dir: str, batches: list[np.ndarray], *, vocab_size: int, threads: int,
                       samples: int = 50) -> dict:
    """The raw limit: forward + encode only, one process, `threads` torch threads."""
    import torch

    from raydistill.models import load_causal_lm

    torch.set_num_threads(threads)
    model = load_causal_lm(teacher_dir)
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():  # warm-up (allocator, kernels): not counted
        model(input_ids=torch.from_numpy(batches[0][:2]))
    fwd = enc = 0.0
    tokens = 0
    for b in batches:
        _, f, e = timed_forward_encode(model, b, samples=samples, vocab_size=vocab_size, generator=gen)
        fwd, enc, tokens = fwd + f, enc + e, tokens + b.size
    return {"tokens": tokens, "seconds": fwd + enc, "forward_s": fwd, "encode_s": enc,
            "tokens_per_s": tokens / (fwd + enc), "threads": threads}


def stage_breakdown(cfg, store, info, batches: list[np.ndarray]) -> dict:
    """In-process costs of each stage of the pass (1 thread, like one replica), for the profile."""
    import pyarrow.parquet as pq
    import torch

    from raydistill.data import DOCS_PER_BATCH, tokenize_and_pack
    from raydistill.models import load_causal_lm
    from raydistill.store import SoftTargetStore
    from raydistill.targets import build_table

    torch.set_num_threads(1)
    texts = pq.read_table(cfg.data.path).column("text").to_pylist()[: cfg.data.max_rows]
    kw = dict(tokenizer_path=cfg.teacher.model, trust_remote_code=False, text_column="text",
              seq_len=cfg.data.seq_len, eos_id=info.eos_token_id or 0)
    tokenize_and_pack({"text": texts[:1]}, **kw)  # loads the tokenizer: not counted
    t = Timer()
    for lo in range(0, len(texts), DOCS_PER_BATCH):
        tokenize_and_pack({"text": texts[lo:lo + DOCS_PER_BATCH]}, **kw)
    tok_s = t()
    model = load_causal_lm(cfg.teacher.model)
    gen = torch.Generator().manual_seed(0)
    fwd = enc = write = 0.0
    tokens = 0
    scratch = SoftTargetStore(os.path.join(os.path.dirname(store.uri), "breakdown-store"))
    per_shard = max(1, cfg.targets.shard_rows // cfg.teacher.batch_size)
    for i in range(0, len(batches), per_shard):
        cols: dict = {}
        ids = np.concatenate(batches[i:i + per_shard])
        for b in batches[i:i + per_shard]:
            encoded, f, e = timed_forward_encode(model, b, samples=50, vocab_size=info.vocab_size, generator=gen)
            for k, v in encoded.items():
                cols.setdefault(k, []).extend(v)
            fwd, enc, tokens = fwd + f, enc + e, tokens + b.size
        t = Timer()
        table = build_table(cols, seq_id=np.arange(len(ids)), input_ids=ids, policy_version=-1, fmt="sampled",
                            vocab_size=info.vocab_size)
        scratch.write_shard(f"b{i:05d}", 1, table)
        write += t()
    shutil.rmtree(scratch.uri, ignore_errors=True)
    total = tok_s + fwd + enc + write
    return {"tokens": tokens, "tokenize_s": tok_s, "forward_s": fwd, "encode_s": enc, "table_write_s": write,
            "one_thread_total_s": total, "one_thread_tokens_per_s": tokens / total,
            "share": {k: round(v / total, 3) for k, v in
                      (("tokenize", tok_s), ("forward", fwd), ("encode", enc), ("table+write", write))}}


def plain_input_build(cfg, info, out_dir: str) -> float:
    """Row 1b's baseline: the input build's work with nothing around it (seconds)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    import raydistill.data as data
    from raydistill.data import DOCS_PER_BATCH, tokenize_and_pack

    data._TOKENIZERS.clear()  # the first tokenize_and_pack loads the tokenizer, as in a fresh run
    t = Timer()
    texts = pq.read_table(cfg.data.path, columns=[cfg.data.text_column]).column(0).to_pylist()
    texts = texts[: cfg.data.max_rows or None]
    kw = dict(tokenizer_path=cfg.teacher.model, trust_remote_code=False, text_column=cfg.data.text_column,
              seq_len=cfg.data.seq_len, eos_id=info.eos_token_id or 0)
    seqs = np.concatenate([b["input_ids"][b["valid"]] for b in
                           (tokenize_and_pack({cfg.data.text_column: texts[lo:lo + DOCS_PER_BATCH]}, **kw)
                            for lo in range(0, len(texts), DOCS_PER_BATCH))])
    os.makedirs(out_dir, exist_ok=True)
    rows = cfg.targets.shard_rows
    for i, lo in enumerate(range(0, len(seqs), rows)):
        part = seqs[lo:lo + rows]
        pq.write_table(pa.table({"seq_id": np.arange(lo, lo + len(part)), "input_ids": list(part)}),
                       os.path.join(out_dir, f"{i:05d}.parquet"), compression="zstd")
    return t()


def _ray_data_build(sizes, cfg, info, work: str) -> float:
    """Row 1c: build_inputs with the driver reader switched off (seconds)."""
    import raydistill.data as data
    from raydistill.pipeline import open_store

    c = bench_config(sizes, teacher=cfg.teacher.model, corpus=cfg.data.path,
                     out_dir=os.path.join(work, "row1c"), name="row1c")
    saved = data.IN_PROCESS_MAX_BYTES, data.IN_PROCESS_MAX_ROWS
    data.IN_PROCESS_MAX_BYTES = data.IN_PROCESS_MAX_ROWS = 0
    try:
        t = Timer()
        data.build_inputs(c, open_store(c, info), info)
        return t()
    finally:  # the stores stay in the run's scratch dir (run.py clears it): an open store holds a lease
        data.IN_PROCESS_MAX_BYTES, data.IN_PROCESS_MAX_ROWS = saved


def run_row_1b(sizes, cfg, info, work: str, details: dict) -> list[Row]:
    """Input build vs the plain baseline, interleaved A B A B; the median of the pairs' ratios."""
    import raydistill.data as data
    from raydistill.pipeline import open_store

    pairs = []
    for i in range(sizes.fixed_repeats):
        c = bench_config(sizes, teacher=cfg.teacher.model, corpus=cfg.data.path,
                         out_dir=os.path.join(work, f"row1b-{i}"), name=f"row1b-{i}")
        store = open_store(c, info)
        data._TOKENIZERS.clear()  # a fresh run loads its tokenizer
        t = Timer()
        res = data.build_inputs(c, store, info)
        build_s = t()
        plain_s = plain_input_build(c, info, os.path.join(work, f"row1b-{i}", "plain"))
        pairs.append({"build_s": build_s, "plain_s": plain_s, "ratio": plain_s / build_s,
                      "train_rows": res["train_rows"], "shards": res["shards"]})
    ray_data_s = _ray_data_build(sizes, cfg, info, work)
    driver_s = pairs[-1]["build_s"]  # the A of the A B pair: the build just before it
    details["row1b"] = {"pairs": pairs, "in_process": data.in_process(*data.resolve_corpus(cfg.data), cfg.data),
                        "ray_data_build_s": ray_data_s}
    mid = sorted(pairs, key=lambda p: p["ratio"])[len(pairs) // 2]
    build = median([p["build_s"] for p in pairs])
    row_c = Row("1c", "input build: driver vs Ray Data reader", ray_data_s, driver_s, "s", ray_data_s / driver_s,
                "info", "info", f"speed-up of the driver reader on this corpus: Ray Data {ray_data_s:.1f}s vs "
                f"driver {driver_s:.2f}s (Ray Data start-up: read, metadata and map tasks, each a worker process)")
    return [Row("1b", "input build vs plain read+tokenize+write", median([p["plain_s"] for p in pairs]), build, "s",
               mid["ratio"], "build <= 3 s", "pass" if build <= 3.0 else "FAIL",
               f"{pairs[0]['train_rows']} sequences, {pairs[0]['shards']} shards; pairs (build / plain s): " +
               ", ".join(f"{p['build_s']:.2f}/{p['plain_s']:.2f}" for p in pairs) +
               ("; packed in the driver" if details["row1b"]["in_process"] else "; Ray Data pipeline")), row_c]


class CommitClock:
    """Stands in for `RunMetrics` in a pass: timestamps every commit (the pass calls it per shard)."""

    def __init__(self):
        self.start = time.perf_counter()
        self.commits: list[tuple[float, int]] = []

    def teacher_rows(self, n, source):
        pass

    def teacher_tokens(self, n, source):
        self.commits.append((time.perf_counter() - self.start, int(n)))

    def steady(self) -> dict:
        """Tokens/s between the first and the last commit (actor start-up and model load left out)."""
        c = sorted(self.commits)
        first = c[0][0] if c else None
        if len(c) < 3:
            return {"first_commit_s": first, "steady_tokens_per_s": None}
        return {"first_commit_s": first, "steady_tokens_per_s": sum(n for _, n in c[1:]) / (c[-1][0] - c[0][0])}


def run_rows_1_2(sizes, assets: dict, work: str, details: dict, profile: bool = False) -> list[Row]:
    from raydistill.data import build_inputs
    from raydistill.pipeline import open_store, preflight, score_pending
    from raydistill.teacher import run_teacher_pass

    n = cores()
    counts = sorted(set(sizes.replicas) | {n})
    cfg = bench_config(sizes, teacher=assets["teacher"], corpus=assets["corpus"],
                       out_dir=os.path.join(work, "row1"), name="row1")
    info = preflight(cfg)
    store = open_store(cfg, info)

    log(f"row 1: teacher pass (build_inputs + score_pending), {n} replicas x 1 CPU")
    t = Timer()
    inputs = build_inputs(cfg, store, info)
    t_inputs = t()
    clock = CommitClock()
    stats = score_pending(cfg, store, info, metrics=clock)
    wall = t()
    tokens = stats["tokens"]
    pipe = {"tokens": tokens, "wall_s": wall, "inputs_s": t_inputs, "pass_s": stats["seconds"],
            "tokens_per_s": tokens / wall, "shards": stats["shards"], "replicas": stats["replicas"],
            "train_rows": inputs["train_rows"], "docs": inputs["docs"],
            "store_bytes_per_token": stats["bytes"] / tokens, **clock.steady()}
    log(f"row 1: pipeline {tokens} tokens in {wall:.1f}s ({pipe['tokens_per_s']:,.0f} tok/s; inputs {t_inputs:.1f}s, "
        f"first commit {pipe['first_commit_s']:.1f}s into the pass); plain loop next")
    batches = _input_batches(store, cfg.teacher.batch_size)
    # The raw limit: torch threads = cores, and (a busy shared machine can make 2 OpenMP threads
    # slower than 1) one thread too; the faster one is the baseline.
    plains = {th: plain_teacher_loop(cfg.teacher.model, batches, vocab_size=info.vocab_size, threads=th)
              for th in dict.fromkeys([n, 1])}
    plain = max(plains.values(), key=lambda p: p["tokens_per_s"])
    assert plain["tokens"] == tokens, (plain["tokens"], tokens)
    log("row 1: plain loop " + ", ".join(f"{p['tokens_per_s']:,.0f} tok/s with {th} thread(s)"
                                          for th, p in plains.items()))
    breakdown = stage_breakdown(cfg, store, info, batches)

    # Row 2: the same shards re-scored (new versions) with 1 (and N, ...) replicas; row 1's pass
    # already scored them with N = cores replicas.
    passes = {n: {"tokens_per_s": stats["tokens_per_s"], "seconds": stats["seconds"], "replicas": stats["replicas"],
                  "shards": stats["shards"], "from": "row 1 pass", **clock.steady()}}
    cfg_r = bench_config(sizes, teacher=assets["teacher"], corpus=assets["corpus"],
                         out_dir=os.path.join(work, "row1"), name="row1", **{"teacher.replicas": max(counts)})
    for r in counts:
        if r in passes:
            continue
        clock_r = CommitClock()
        prof = None
        if profile and r == 1:  # py-spy the one replica: start-up, model load, scoring, writing
            from pyspy import Profile

            prof = Profile("TeacherReplica", os.path.join(work, "profiles", "teacher_replica.txt"), duration_s=180)
            prof.__enter__()
        try:
            res = run_teacher_pass(cfg_r, store, store.shard_ids(), vocab_size=info.vocab_size,
                                   teacher_rev=info.teacher_rev, step=0, source="bench", seed=r, max_replicas=r,
                                   metrics=clock_r)
        finally:
            if prof:
                prof.__exit__(None, None, None)
                details["profile_teacher_replica"] = prof.summary
        passes[r] = {"tokens_per_s": res["tokens_per_s"], "seconds": res["seconds"], "replicas": res["replicas"],
                     "shards": res["shards"], **clock_r.steady()}
    for r in counts:
        p = passes[r]
        log(f"row 2: {r} replica(s): {p['tokens_per_s']:,.0f} tok/s over the pass ({p['seconds']:.1f}s), "
            f"{p['steady_tokens_per_s'] or float('nan'):,.0f} tok/s after the first commit at {p['first_commit_s']:.1f}s")
    details["row1"] = {"pipeline": pipe, "plain": plain, "plain_by_threads": plains, "breakdown": breakdown}
    details["row2"] = passes

    ratio = pipe["tokens_per_s"] / plain["tokens_per_s"]
    steady = pipe["steady_tokens_per_s"]
    note = (f"baseline = plain loop with {plain['threads']} torch thread(s) (" +
            ", ".join(f"{th}: {p['tokens_per_s']:,.0f}" for th, p in plains.items()) + f" tok/s); "
            f"{tokens:,} tokens; wall {wall:.1f}s = inputs {t_inputs:.1f}s (row 1b) + pass "
            f"{stats['seconds']:.1f}s, of which {pipe['first_commit_s']:.1f}s to the first commit (actor start, "
            f"model load, first shard)")
    if steady:
        note += f"; after the first commit the pass runs at {steady:,.0f} tok/s = {steady / plain['tokens_per_s']:.2f} of plain"
    if n <= 2:
        note += "; 2 cores: replicas can only split the cores the plain loop already uses, so start-up, " \
                "tokenize and write costs are not hidden (< 1 expected)"
    rows = [Row("1", "teacher pass vs plain fwd+encode loop", plain["tokens_per_s"], pipe["tokens_per_s"],
                "tok/s", ratio, ">= 1.0 (multi-core)", judge(ratio, ">=", 1.0), note)]
    rows += run_row_1b(sizes, cfg, info, work, details)
    base = passes[counts[0]]
    for r in counts[1:]:
        p = passes[r]
        label = f"{r} replicas vs 1 (whole pass)" + (" N = cores" if r == n else "")
        ratio_r = p["tokens_per_s"] / base["tokens_per_s"]
        steady_txt = ""
        if p["steady_tokens_per_s"] and base["steady_tokens_per_s"]:
            steady_txt = (f"; after the first commit: {p['steady_tokens_per_s']:,.0f} vs "
                          f"{base['steady_tokens_per_s']:,.0f} tok/s (x{p['steady_tokens_per_s'] / base['steady_tokens_per_s']:.2f})")
        rows.append(Row("2", label, base["tokens_per_s"], p["tokens_per_s"], "tok/s", ratio_r,
                        f"info (ideal {min(r, n)}.0)", "info",
                        f"pass {p['seconds']:.1f}s vs {base['seconds']:.1f}s; first commit {p['first_commit_s']:.1f}s vs "
                        f"{base['first_commit_s']:.1f}s" + steady_txt + ("; more replicas than cores" if r > n else "")))
    return rows
