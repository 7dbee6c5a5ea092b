"""A checkable-answer task built offline: 2-digit addition, and a tiny teacher that writes its working.

    question  "57+68="
    rationale " 7+8=15,5+6+1=12;A:125"     (units, then tens with the carry, then the answer)
    answer    "125"                          (data.answer_column)
    response  "A:125"                        (the dataset's own response: the answer alone)

The teacher (a small GPT-2, byte-level tokenizer with no merges: one token per character) is trained
here, in plain torch, on TEMPLATE(question) + rationale + EOS with the loss on the rationale, so a
generation pass with `generate.prompt_template: TEMPLATE` gets rationales from it; the answer
follows ANSWER_PREFIX. Everything is seeded.
"""
from __future__ import annotations

import random

import pyarrow as pa
import pyarrow.parquet as pq
import torch

import tiny

TEMPLATE = "{prompt}\nLet's think step by step."
ANSWER_PREFIX = "A:"


def question(a: int, b: int) -> str:
    return f"{a}+{b}="


def rationale(a: int, b: int) -> str:
    units = a % 10 + b % 10
    carry = units // 10
    return f" {a % 10}+{b % 10}={units},{a // 10}+{b // 10}+{carry}={a // 10 + b // 10 + carry};{ANSWER_PREFIX}{a + b}"


def pairs(seed: int = 0) -> list[tuple[int, int]]:
    """Every 2-digit pair, shuffled."""
    out = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    random.Random(seed).shuffle(out)
    return out


def write_corpus(path: str, qa: list[tuple[int, int]]) -> str:
    """The question/answer file: question, answer, and the answer-only response."""
    pq.write_table(pa.table({"question": [question(a, b) for a, b in qa],
                             "answer": [str(a + b) for a, b in qa],
                             "response": [f"{ANSWER_PREFIX}{a + b}" for a, b in qa]}), path)
    return path


def make_char_tokenizer(out_dir: str):
    """Byte-level BPE with no merges (256 byte tokens + EOS): one token per character."""
    texts = [TEMPLATE.format(prompt=question(a, b)) + rationale(a, b) for a, b in pairs()[:50]]
    return tiny.make_tokenizer(out_dir, texts, vocab_size=257)


def _rows(tok, qa, template: str | None, respond) -> list[tuple[list[int], list[int]]]:
    eos = tok.eos_token_id
    out = []
    for a, b in qa:
        p = question(a, b) if template is None else template.format(prompt=question(a, b))
        out.append((tok(p, add_special_tokens=False)["input_ids"],
                    tok(respond(a, b), add_special_tokens=False)["input_ids"] + [eos]))
    return out


def _batch(rows, seq_len: int, pad: int):
    seq_len = min(seq_len, max(len(p) + len(r) for p, r in rows))  # pad to the batch's longest only
    ids = torch.full((len(rows), seq_len), pad)
    labels = torch.full((len(rows), seq_len), -100)
    for i, (p, r) in enumerate(rows):
        x = (p + r)[:seq_len]
        ids[i, :len(x)] = torch.tensor(x)
        labels[i, len(p):len(x)] = torch.tensor(x[len(p):])
    return ids, labels


def train_teacher(out_dir: str, tok, qa: list[tuple[int, int]], *, steps: int = 1500, batch: int = 64,
                  n_layer: int = 2, n_embd: int = 64, seq_len: int = 64, lr: float = 3e-3, seed: int = 1,
                  progress=None):
    """A GPT-2 trained to write TEMPLATE(question) -> rationale + answer; saved (safetensors + tokenizer).
    `progress(step, loss)` is called every 100 steps."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    torch.set_num_threads(1)  # a shared, loaded machine: 2 threads per op mostly wait for each other
    eos = tok.eos_token_id
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_layer=n_layer, n_embd=n_embd, n_head=2,
                                       n_positions=seq_len, bos_token_id=eos, eos_token_id=eos))
    rows = _rows(tok, qa, TEMPLATE, rationale)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * max(0.0, 1 - s / steps))
    g = random.Random(seed)
    model.train()
    for step in range(steps):
        ids, labels = _batch(g.sample(rows, batch), seq_len, eos)
        loss = model(input_ids=ids, labels=labels).loss
        if progress is not None and step % 100 == 0:
            progress(step, loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return model, loss.item()


def run_config(name: str, teacher: str, corpus: str, out: str, *, rationale: bool, student_steps: int,
               eval_fraction: float = 0.2, seed: int = 0, workers: int = 1, student_width: int = 32,
               hard_labels: bool = True):
    """The pipeline config of one arm of the comparison (bench/rationale_rows.py, the e2e test).

    rationale: the teacher writes every training response (TEMPLATE, greedy), CE + token KD (alpha 0.5),
    and, with `hard_labels`, the same student with CE only beside it (run.compare_hard_labels); else the
    answers alone, CE only. The student is a 2-layer copy of the teacher's architecture, `student_width` wide."""
    from raydistill.config import load_config

    over = [f"run.name={name}", f"run.output_dir={out}", f"run.seed={seed}", f"teacher.model={teacher}",
            f"student.init_from_teacher={{n_layer: 2, n_embd: {student_width}}}", f"data.path={corpus}",
            "data.format=prompt_response", "data.prompt_column=question", "data.response_column=response",
            "data.answer_column=answer", "data.seq_len=64", f"data.eval_fraction={eval_fraction}",
            f"rationale.answer_prefix='{ANSWER_PREFIX}'", "targets.format=topk", "targets.k=8",
            "targets.shard_rows=256", "teacher.replicas=1", "teacher.batch_size=64", "generate.max_new_tokens=28",
            f"train.workers={workers}", "train.batch_size=32", "train.lr=3e-3", "train.warmup_steps=20",
            f"train.max_steps={student_steps}", "train.epochs=100", "train.checkpoint_every=1000",
            "train.log_every=50"]
    if rationale:
        over += ["generate.enabled=true", "generate.temperature=0", f"generate.prompt_template={TEMPLATE!r}",
                 "train.alpha=0.5", f"run.compare_hard_labels={str(hard_labels).lower()}"]
    else:
        over += ["train.alpha=0"]
    return load_config(None, over)
