#!/usr/bin/env python
"""Row 10: store bytes per token of instruction data, targets on the response only vs on every token.

    python bench/instruct_rows.py [--quick] [--examples N]

Method: prompt/response examples cut from the bench corpus (Python stdlib source: a prompt of 1-6
lines, the response the next 1-3 lines), rendered as `data.format: prompt_response` rows of
`seq_len` tokens. For `data.loss_on: response` and then `all` (the baseline: targets at every real
token), for `targets.format` sampled (N = 50) and topk (k = 32): the data phase (`build_inputs`, in
the driver) and a teacher pass through the package's own `TeacherReplica.score_shard` in this process
(the same encode and Parquet writer as a Ray pass; no Ray: bytes, not speed, are measured here).
Figure: target-shard bytes per real (non-pad) token, and the ratio response / all. The ratio is
close to the response share of the real tokens plus the per-row columns (input_ids, loss_mask, ...)
that both stores keep; a random-init teacher (near-uniform: ~48 unique ids of 50 draws per position)
makes sampled positions heavier than a trained teacher's, so read the ratio, not the bytes.
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import QUICK, FULL, TMP, corpus_and_tokenizer, gpt2_dir, log, setup_env  # noqa: E402

setup_env()


def example_corpus(corpus: str, tok_dir: str, out: str, n: int, seq_len: int, seed: int = 0) -> str:
    """Parquet of prompt/response pairs: consecutive line groups of the corpus's documents, only
    those that fit in seq_len tokens (so both stores hold the same rows, none truncated)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    rng = random.Random(seed)
    pairs = []
    for text in pq.read_table(corpus, columns=["text"])["text"].to_pylist():
        lines = [ln for ln in text.splitlines() if ln.strip()]
        p, r = rng.randint(1, 6), rng.randint(1, 3)
        pair = ("\n".join(lines[:p]) + "\n", "\n".join(lines[p:p + r]))
        if len(lines) >= p + r and sum(len(tok(x)["input_ids"]) for x in pair) + 1 <= seq_len:
            pairs.append(pair)
        if len(pairs) == n:
            break
    pq.write_table(pa.table({"prompt": [a for a, _ in pairs], "response": [b for _, b in pairs]}), out)
    return out


def store_bytes(work: str, teacher: str, corpus: str, seq_len: int, fmt: str, loss_on: str) -> dict:
    """(target bytes, real tokens, loss positions) of one store built and scored in this process."""
    import numpy as np

    from raydistill.config import load_config
    from raydistill.data import build_inputs
    from raydistill.models import preflight
    from raydistill.pipeline import open_store
    from raydistill.teacher import TeacherReplica, target_params

    out = os.path.join(work, f"{fmt}-{loss_on}")
    shutil.rmtree(out, ignore_errors=True)
    cfg = load_config(None, [f"teacher.model={teacher}", "student.init_from_teacher={n_layer: 1}",
                             f"data.path={corpus}", "data.format=prompt_response", f"data.loss_on={loss_on}",
                             f"data.seq_len={seq_len}", "data.eval_fraction=0", f"targets.format={fmt}",
                             "targets.samples=50", "targets.k=32", "targets.shard_rows=64",
                             "teacher.batch_size=16", f"run.output_dir={out}", f"run.name=bench-instruct-{fmt}"])
    info = preflight(cfg)
    store = open_store(cfg, info)
    try:
        build_inputs(cfg, store, info)
        replica = TeacherReplica(config=cfg.to_dict(), targets=target_params(cfg.targets),
                                 vocab_size=info.vocab_size, store_uri=store.uri)
        shards = store.manifest()["inputs"]["shards"]
        total = {"bytes": 0, "real_tokens": 0, "loss_positions": 0, "rows": 0}
        for sid, rec in shards.items():
            done = replica.score_shard(sid, 1, rec["input"], 0, -1)
            table = store.read_input(sid)
            mask = np.stack(table["loss_mask"].to_numpy(zero_copy_only=False))
            total["bytes"] += done["bytes"]
            total["real_tokens"] += int(table["length"].to_numpy().sum())
            total["loss_positions"] += int(mask[:, 1:].sum())
            total["rows"] += table.num_rows
    finally:
        store.release_lease()
    return total


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--examples", type=int, default=None, help="examples (default 256 quick, 1024 full)")
    args = ap.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    n = args.examples or (256 if args.quick else 1024)
    work = os.path.join(TMP, "instruct")
    os.makedirs(work, exist_ok=True)
    corpus, tok = corpus_and_tokenizer(sizes, 2048)
    teacher = gpt2_dir(tok, n_layer=sizes.teacher_layers, n_embd=sizes.teacher_embd, n_head=sizes.teacher_heads,
                       n_positions=sizes.seq_len, seed=1, tag="teacher2k")
    examples = example_corpus(corpus, tok, os.path.join(work, "examples.parquet"), n, sizes.seq_len)
    print(f"{'format':8} {'loss_on':9} {'rows':>5} {'real tok':>9} {'loss pos':>9} {'bytes':>10} {'B/real tok':>10}")
    for fmt in ("sampled", "topk"):
        got = {}
        for loss_on in ("response", "all"):
            s = got[loss_on] = store_bytes(work, teacher, examples, sizes.seq_len, fmt, loss_on)
            print(f"{fmt:8} {loss_on:9} {s['rows']:5d} {s['real_tokens']:9d} {s['loss_positions']:9d} "
                  f"{s['bytes']:10d} {s['bytes'] / s['real_tokens']:10.1f}")
        r, a = got["response"], got["all"]
        assert r["rows"] == a["rows"] and r["real_tokens"] == a["real_tokens"], (r, a)  # the same examples
        log(f"{fmt}: bytes/token response {r['bytes'] / r['real_tokens']:.1f} vs all {a['bytes'] / a['real_tokens']:.1f}"
            f" = {r['bytes'] / a['bytes']:.3f}x (loss positions {r['loss_positions'] / a['loss_positions']:.3f}x "
            f"of all's)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
