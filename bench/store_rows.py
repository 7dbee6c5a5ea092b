"""Row 5: store size (bytes/token on disk) and fidelity of `sampled` (N) and `topk` (k) targets.

Model: a GPT-2 with a 32,000-token byte-level BPE vocabulary (ids stored as uint16), trained here
for a fixed time budget on the standard-library corpus (cached: later runs reuse it) so that its
distributions are not uniform. The "student" of the fidelity measures is the same teacher's
checkpoint at `v32_student_at` of that budget (a plausible partly-trained student).

Held-out sequences (corpus documents the teacher never trained on) are scored once; for each format
the targets go through the production path (`targets.encode` → `targets.build_table` →
`SoftTargetStore.write_shard`, zstd Parquet) and bytes/token = shard file bytes / (rows × seq_len),
as `SoftTargetStore.summary()` counts it. Fidelity = `targets.fidelity` on the first sequences of
the shard, decoded back from the file (float16 rounding included), against the dense teacher.

A briefly trained small model is far less certain than a real LLM (mean entropy ~5-7 nats vs
~2-3), and the size of `sampled` targets grows with entropy (more unique ids per position). So one
more line scores the same logits sharpened to an LLM-like mean entropy (`llm_entropy` nats, via
`capture_temperature` < 1, i.e. logits / tau) to show what the format costs on a confident teacher.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time

import numpy as np

from common import CACHE, Row, Timer, _key, corpus_and_tokenizer, log

HELD_OUT_DOCS = 40  # the corpus's last documents: never seen by the row-5 teacher


def _pack(tokenizer, texts: list[str], seq_len: int, need: int) -> "torch.Tensor":
    import torch

    ids: list[int] = []
    for lo in range(0, len(texts), 32):
        for doc in tokenizer(texts[lo:lo + 32], add_special_tokens=False)["input_ids"]:
            ids.extend(doc)
            ids.append(tokenizer.eos_token_id)
        if len(ids) >= need * seq_len:
            break
    n = min(need, len(ids) // seq_len)
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def trained_teacher_32k(sizes) -> tuple[str, str, dict]:
    """(teacher dir, student dir, training record); trained once per shape + budget, then cached."""
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    corpus, tok_dir = corpus_and_tokenizer(sizes, 32000)
    shape = dict(n_layer=sizes.v32_layers, n_embd=sizes.v32_embd, n_head=sizes.v32_heads, seq_len=sizes.seq_len,
                 budget_s=sizes.v32_train_s, batch=sizes.v32_train_batch, at=sizes.v32_student_at, lr=sizes.v32_lr)
    out = os.path.join(CACHE, f"teacher32k-{_key([tok_dir, shape])}")
    record_path = os.path.join(out, "bench_train.json")
    if os.path.exists(record_path):
        with open(record_path) as f:
            return os.path.join(out, "teacher"), os.path.join(out, "student"), json.load(f)
    import glob

    for stale in glob.glob(out + ".tmp-*"):  # an earlier, uncached or interrupted training
        shutil.rmtree(stale, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    texts = pq.read_table(corpus).column("text").to_pylist()
    train = _pack(tok, texts[:-HELD_OUT_DOCS], sizes.seq_len, 20000)
    held = _pack(tok, texts[-HELD_OUT_DOCS:], sizes.seq_len, 32)
    eos = tok.eos_token_id
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    cfg = GPT2Config(vocab_size=len(tok), n_layer=sizes.v32_layers, n_embd=sizes.v32_embd, n_head=sizes.v32_heads,
                     n_positions=sizes.seq_len, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    model = GPT2LMHeadModel(cfg)
    lr = sizes.v32_lr
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    tmp = out + f".tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)

    def held_ce():
        with torch.no_grad():
            return float(model(input_ids=held, labels=held).loss)

    log(f"row 5: training the 32k-vocab teacher ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
        f"params) for {sizes.v32_train_s:.0f}s (cached afterwards)")
    start, step, student_ce = time.time(), 0, None
    while time.time() - start < sizes.v32_train_s:
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 10)
        x = train[torch.randint(0, len(train), (sizes.v32_train_batch,), generator=gen)]
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if student_ce is None and time.time() - start >= sizes.v32_student_at * sizes.v32_train_s:
            model.save_pretrained(os.path.join(tmp, "student"), safe_serialization=True)
            student_ce, student_step = held_ce(), step
    model.save_pretrained(os.path.join(tmp, "teacher"), safe_serialization=True)
    record = {"steps": step, "seconds": round(time.time() - start, 1), "teacher_held_out_ce": held_ce(),
              "student_step": student_step, "student_held_out_ce": student_ce, "vocab": len(tok),
              "params": sum(p.numel() for p in model.parameters()), "shape": shape,
              "train_tokens_seen": step * sizes.v32_train_batch * sizes.seq_len}
    with open(os.path.join(tmp, "bench_train.json"), "w") as f:
        json.dump(record, f, indent=1)
    tok.save_pretrained(os.path.join(tmp, "teacher"))
    log(f"row 5: teacher {step} steps, held-out CE {record['teacher_held_out_ce']:.2f} "
        f"(student checkpoint {student_ce:.2f}, uniform {math.log(len(tok)):.2f})")
    if step < sizes.v32_min_steps:  # a busy machine: use it this time, train again next run
        log(f"row 5: only {step} of the {sizes.v32_min_steps} steps wanted fit the budget: not cached")
        record["cached"] = False
        return os.path.join(tmp, "teacher"), os.path.join(tmp, "student"), record
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return os.path.join(out, "teacher"), os.path.join(out, "student"), record


def _entropy(logits, tau: float) -> float:
    import torch.nn.functional as F

    lp = F.log_softmax(logits.float() / tau, dim=-1)
    return float(-(lp.exp() * lp).sum(-1).mean())


def _tau_for(logits, target: float) -> float:
    lo, hi = 0.02, 1.0
    if _entropy(logits, hi) <= target:
        return 1.0
    for _ in range(16):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if _entropy(logits, mid) < target else (lo, mid)
    return math.sqrt(lo * hi)


def run_row_5(sizes, work: str, details: dict) -> list[Row]:
    import pyarrow.parquet as pq
    import torch

    from raydistill.models import load_causal_lm
    from raydistill.store import SoftTargetStore
    from raydistill.targets import build_table, decode, encode, fidelity, id_type

    torch.set_num_threads(os.cpu_count() or 1)
    teacher_dir, student_dir, record = trained_teacher_32k(sizes)
    corpus, tok_dir = corpus_and_tokenizer(sizes, 32000)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    texts = pq.read_table(corpus).column("text").to_pylist()[-HELD_OUT_DOCS:]
    seqs = _pack(tok, texts, sizes.seq_len, sizes.v32_store_seqs)
    teacher, student = load_causal_lm(teacher_dir), load_causal_lm(student_dir)
    vocab = teacher.config.vocab_size
    assert id_type(vocab).bit_width == 16
    n_fid = min(sizes.v32_fid_seqs, len(seqs))
    with torch.inference_mode():
        t_fid = teacher(input_ids=seqs[:n_fid]).logits.float()
        s_fid = student(input_ids=seqs[:n_fid]).logits.float()
    entropy = _entropy(t_fid[:, :-1], 1.0)
    tau = _tau_for(t_fid[:, :-1].reshape(-1, vocab)[:256], sizes.llm_entropy)
    log(f"row 5: {len(seqs)} held-out sequences x {sizes.seq_len}; teacher mean entropy {entropy:.2f} nats; "
        f"tau {tau:.3f} gives {sizes.llm_entropy} nats")

    formats = [(f"sampled N={n}", dict(fmt="sampled", samples=n), 1.0) for n in sizes.sampled_n]
    formats += [(f"topk k={k}", dict(fmt="topk", k=k), 1.0) for k in sizes.topk_k]
    formats += [(f"sampled N=50 @ {sizes.llm_entropy:g} nats", dict(fmt="sampled", samples=50), tau)]
    cols = {name: {} for name, _, _ in formats}
    gens = {name: torch.Generator().manual_seed(i) for i, (name, _, _) in enumerate(formats)}
    encode_s = {name: 0.0 for name, _, _ in formats}
    mb = 8
    for lo in range(0, len(seqs), mb):
        x = seqs[lo:lo + mb]
        with torch.inference_mode():
            logits = teacher(input_ids=x).logits
        for name, kw, temp in formats:
            t = Timer()
            enc = encode(logits, x, capture_temperature=temp, vocab_size=vocab, generator=gens[name],
                         k=kw.get("k"), samples=kw.get("samples"), fmt=kw["fmt"])
            encode_s[name] += t()
            for c, v in enc.items():
                cols[name].setdefault(c, []).extend(v)

    scratch = SoftTargetStore(os.path.join(work, "row5-store"))
    tokens = seqs.numel()
    labels = seqs[:n_fid, 1:]
    dense_bytes = 2 * vocab
    rows, out = [], {}
    for i, (name, kw, temp) in enumerate(formats):
        table = build_table(cols[name], seq_id=np.arange(len(seqs)), input_ids=seqs, policy_version=-1,
                            fmt=kw["fmt"], vocab_size=vocab)
        written = scratch.write_shard(f"s{i}", 1, table)
        bpt = written["bytes"] / tokens
        shard = pq.read_table(scratch.full_path(written["path"]))
        _, targets = decode(shard.slice(0, n_fid), kw["fmt"])
        fid = fidelity(t_fid[:, :-1] / temp, s_fid[:, :-1], targets, labels)
        col_bytes = {c: shard.column(c).nbytes for c in shard.column_names}
        res = {"bytes_per_token": bpt, "file_bytes": written["bytes"], "tokens": tokens,
               "encode_s": encode_s[name], "capture_temperature": temp, "fidelity": fid,
               "arrow_bytes_per_token": {c: round(b / tokens, 2) for c, b in col_bytes.items()}}
        if kw["fmt"] == "sampled":
            res["unique_ids_per_position"] = float(np.mean(np.concatenate(cols[name]["sample_len"])))
        out[name] = res
        target, status = "info", "info"
        if name == "sampled N=50":
            target, status = "<= 60 B/token", "pass" if bpt <= 60 else "FAIL"
        elif name == "topk k=32":
            target, status = "<= 200 B/token", "pass" if bpt <= 200 else "FAIL"
        uniq = f"{res['unique_ids_per_position']:.1f} unique ids/pos; " if "unique_ids_per_position" in res else ""
        rows.append(Row("5", name, dense_bytes, bpt, "B/token", bpt / dense_bytes, target, status,
                        f"{uniq}mass {fid['captured_mass_mean']:.2f} (p5 {fid['captured_mass_p5']:.2f}); CE bias "
                        f"{fid['ce_bias']:+.3f} nats ({100 * fid['ce_bias_rel']:+.1f}%); grad angle "
                        f"{fid['grad_angle_deg']:.0f} deg/token, {fid['grad_angle_batch_deg']:.0f} deg/batch"))
    shutil.rmtree(scratch.uri, ignore_errors=True)
    details["row5"] = {"teacher": record, "teacher_dir": teacher_dir, "held_out_sequences": len(seqs),
                       "seq_len": sizes.seq_len, "fidelity_sequences": n_fid, "teacher_entropy_nats": entropy,
                       "tau_llm_entropy": tau, "vocab": vocab, "dense_fp16_bytes_per_token": dense_bytes,
                       "formats": out}
    return rows
