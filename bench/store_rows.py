"""Row 5: store size (bytes/token on disk) and fidelity of `sampled` (N) and `topk` (k) targets.

Model: a GPT-2 with a 32,000-token byte-level BPE vocabulary (ids stored as uint16), trained here
on the standard-library corpus so that its distributions are not uniform: `v32_steps` steps in
all, at most `v32_train_s` seconds per bench run, cached and resumed by the next run when a busy
machine cut it short (the table's first row-5 line says how far it got). The "student" of the
fidelity measures is the same teacher's checkpoint at `v32_student_at` of the steps.

Held-out sequences (corpus documents the teacher never trained on) are scored once; for each format
the targets go through the production path (`targets.encode` → `targets.build_table` →
`SoftTargetStore.write_shard`, zstd Parquet) and bytes/token = shard file bytes / (rows × seq_len),
as `SoftTargetStore.summary()` counts it. Fidelity = `fidelity.fidelity` on the first sequences of
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
    """(teacher dir, student dir, training record) of the row-5 teacher.

    Trained for `v32_steps` steps in all, at most `v32_train_s` seconds per bench run: a run on a
    busy machine trains part of it and the next run resumes (model + optimizer state are cached
    under bench/results/tmp/cache). The record says how far it got; the student is the checkpoint
    at step `v32_student_at` x `v32_steps`.
    """
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    corpus, tok_dir = corpus_and_tokenizer(sizes, 32000)
    shape = dict(n_layer=sizes.v32_layers, n_embd=sizes.v32_embd, n_head=sizes.v32_heads,
                 seq_len=sizes.v32_train_seq, batch=sizes.v32_train_batch, lr=sizes.v32_lr, steps=sizes.v32_steps,
                 at=sizes.v32_student_at)
    out = os.path.join(CACHE, f"teacher32k-{_key([tok_dir, shape])}")
    teacher_dir, student_dir = os.path.join(out, "teacher"), os.path.join(out, "student")
    record_path = os.path.join(out, "bench_train.json")
    record = {"steps": 0, "seconds": 0.0, "runs": 0}
    if os.path.exists(record_path):
        with open(record_path) as f:
            record = json.load(f)
    if record["steps"] >= sizes.v32_steps:
        return teacher_dir, student_dir, dict(record, trained_this_run=0)

    tok = AutoTokenizer.from_pretrained(tok_dir)
    texts = pq.read_table(corpus).column("text").to_pylist()
    train = _pack(tok, texts[:-HELD_OUT_DOCS], sizes.v32_train_seq, 40000)
    held = _pack(tok, texts[-HELD_OUT_DOCS:], sizes.seq_len, 32)
    eos = tok.eos_token_id
    torch.set_num_threads(os.cpu_count() or 1)
    if record["steps"]:
        model = GPT2LMHeadModel.from_pretrained(teacher_dir)
    else:
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(
            vocab_size=len(tok), n_layer=sizes.v32_layers, n_embd=sizes.v32_embd, n_head=sizes.v32_heads,
            n_positions=sizes.seq_len, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            bos_token_id=eos, eos_token_id=eos, pad_token_id=eos))
    model.train()
    lr = sizes.v32_lr
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    opt_path = os.path.join(out, "optimizer.pt")
    if record["steps"] and os.path.exists(opt_path):
        opt.load_state_dict(torch.load(opt_path, weights_only=True))
    gen = torch.Generator().manual_seed(record["steps"])
    student_at = max(1, round(sizes.v32_student_at * sizes.v32_steps))

    def held_ce():
        with torch.no_grad():
            return float(model(input_ids=held, labels=held).loss)

    def save(what: str):
        tmp = os.path.join(out, f".tmp-{what}")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, safe_serialization=True)
        if what == "teacher":
            tok.save_pretrained(tmp)
        shutil.rmtree(os.path.join(out, what), ignore_errors=True)
        os.replace(tmp, os.path.join(out, what))

    os.makedirs(out, exist_ok=True)
    log(f"row 5: training the 32k-vocab teacher ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params) "
        f"from step {record['steps']} towards {sizes.v32_steps}, at most {sizes.v32_train_s:.0f}s this run")
    start, step = time.time(), record["steps"]
    while step < sizes.v32_steps and time.time() - start < sizes.v32_train_s:
        for g in opt.param_groups:  # warm-up, then cosine to 10%
            frac = step / sizes.v32_steps
            g["lr"] = lr * min(1.0, (step + 1) / 20) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        x = train[torch.randint(0, len(train), (sizes.v32_train_batch,), generator=gen)]
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if step == student_at:
            save("student")
            record["student_step"], record["student_held_out_ce"] = step, held_ce()
    ran = step - record["steps"]
    record.update(steps=step, seconds=round(record["seconds"] + time.time() - start, 1), runs=record["runs"] + 1,
                  teacher_held_out_ce=held_ce(), vocab=len(tok), uniform_ce=math.log(len(tok)),
                  params=sum(p.numel() for p in model.parameters()), shape=shape, target_steps=sizes.v32_steps,
                  train_tokens_seen=step * sizes.v32_train_batch * sizes.v32_train_seq)
    save("teacher")
    if not os.path.exists(student_dir):  # not reached yet: the current weights stand in
        save("student")
        record["student_step"], record["student_held_out_ce"] = step, record["teacher_held_out_ce"]
    torch.save(opt.state_dict(), opt_path)
    with open(record_path + ".tmp", "w") as f:
        json.dump(record, f, indent=1)
    os.replace(record_path + ".tmp", record_path)
    log(f"row 5: teacher at step {step}/{sizes.v32_steps} (+{ran} this run), held-out CE "
        f"{record['teacher_held_out_ce']:.2f} (uniform {record['uniform_ce']:.2f}; student checkpoint "
        f"{record['student_held_out_ce']:.2f} at step {record['student_step']})")
    return teacher_dir, student_dir, dict(record, trained_this_run=ran)


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

    from raydistill.fidelity import fidelity
    from raydistill.models import load_causal_lm
    from raydistill.store import SoftTargetStore
    from raydistill.targets import build_table, decode, encode, id_type

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
    formats += [(f"sampled N=50 @ {sizes.llm_entropy:g} nats", dict(fmt="sampled", samples=50), tau),
                (f"topk k=32 @ {sizes.llm_entropy:g} nats", dict(fmt="topk", k=32), tau)]
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
    rows.append(Row("5", "row-5 teacher: held-out CE vs uniform", record["uniform_ce"], record["teacher_held_out_ce"],
                    "nats", record["teacher_held_out_ce"] / record["uniform_ce"], "info", "info",
                    f"32k-vocab GPT-2 {sizes.v32_layers}x{sizes.v32_embd}, step {record['steps']}/{record['target_steps']} "
                    f"(+{record['trained_this_run']} this run); mean entropy {entropy:.2f} nats on the held-out "
                    f"sequences; student = step-{record['student_step']} checkpoint (CE "
                    f"{record['student_held_out_ce']:.2f}); '@ {sizes.llm_entropy:g} nats' lines: logits / {tau:.3f}"))
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
        # Targets at an LLM-like entropy: the cost of `sampled` grows with the teacher's entropy (unique
        # ids per position), and this bench's small teacher is far flatter than a trained LLM.
        if name.startswith("sampled N=50 @"):
            target, status = "<= 60 B/token", "pass" if bpt <= 60 else "FAIL"
        elif name.startswith("topk k=32 @"):
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
