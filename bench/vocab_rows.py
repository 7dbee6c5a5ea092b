"""Row 9: memory-bounded KD at a 128,256-id vocabulary (issue 16), chunked vs today's full logits.

Every figure comes from a fresh child process (`python bench/vocab_rows.py --child '<json>'`) that
builds a tiny Llama (hidden 32, 1 layer: the vocabulary is the memory) from config, runs one warm-up
step (so weights, gradients and AdamW state exist), then measures:

  extra peak  VmHWM - VmRSS over one more step: the Linux high-water mark is reset just before it
              (`/proc/self/clear_refs` = 5), and glibc is told to mmap every block >= 64 KiB
              (MALLOC_MMAP_THRESHOLD_) so freed tensors leave RSS at once instead of hiding in
              malloc arenas. This is what the step adds on top of the model, its gradients and
              optimizer state (which both variants hold alike).
  step time   median of `steps` further steps.

Variants: `full` = today's path (`model(...).logits[:, :-1]` -> `losses.distill_loss`); `fused` =
`chunked_loss.model_hidden` + `fused_distill_loss` (gradients computed in the forward chunk loop);
`recompute` = the alternative design, each chunk under `torch.utils.checkpoint` (recomputed in
backward). Teacher: a forward + `targets.encode` vs `model_hidden` + `encode_chunked`. Growth
(9d, 9e): the same variant at V = 32,000 (A) and 262,144 (B). Online (9f, `train.online`): a
second tiny Llama as the teacher, its forward inside every step as `Trainer.targets_for` runs it —
`full` = its logits[..., :W] -> `from_logits` dense targets -> `distill_loss` on the student's full
logits; `fused` = `model_hidden` -> `TeacherHead` -> `fused_distill_loss` (both models' logits per
chunk). The A and B children run interleaved (A B A B ...), and ratios are medians over the repeats.
`python bench/vocab_rows.py --row 9f` runs 9f alone and prints its figures as JSON.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import statistics
import subprocess
import sys
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
V128 = 128_256
ONLINE_TEACHER_HIDDEN = 64  # row 9f: a teacher wider than the student (hidden 32), still tiny


# ------------------------------------------------------------------------------------ child side

def _status_mib(key: str) -> float:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M).group(1)) / 1024


def _llama(vocab: int, hidden: int, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=4096,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def _topk_targets(bsz: int, t: int, vocab: int, k: int, seed: int):
    """Random top-k targets as decode gives them (k ids, log-probs, tail): the store's shape."""
    import torch

    from raydistill.targets import SparseTargets

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (bsz, t, k), generator=g)
    lp = torch.log_softmax(torch.randn(bsz, t, k + 1, generator=g) * 2, -1)
    return SparseTargets(ids, lp[..., :k], lp[..., k], lp[..., 0], "topk")


def _train_step_fn(spec, model, input_ids, targets):
    import torch

    from raydistill import chunked_loss as cl
    from raydistill.losses import distill_loss

    labels = input_ids[:, 1:]
    kw = dict(alpha=0.5, temperature=1.0, loss="forward_kl")
    chunk = cl.chunk_tokens_for(spec["vocab"], spec["chunk_tokens"])

    def full():
        return distill_loss(model(input_ids=input_ids).logits[:, :-1], targets, labels, **kw)[0]

    def fused():
        hidden, w, b = cl.model_hidden(model, input_ids)
        return cl.fused_distill_loss(hidden[:, :-1], w, targets, labels, bias=b, chunk_tokens=chunk, **kw)[0]

    def recompute():  # the design not taken: checkpointed chunks, logits recomputed in backward
        from torch.utils.checkpoint import checkpoint

        hidden, w, _ = cl.model_hidden(model, input_ids)
        rows, lab = hidden[:, :-1].reshape(-1, hidden.shape[-1]), labels.reshape(-1)
        tgt = targets.select(torch.ones_like(labels, dtype=torch.bool))
        spec_ = dict(kw, jsd_beta=0.5)
        total = 0.0
        for lo, hi in cl._chunks(rows.shape[0], chunk):
            def one(h, w, lo=lo, hi=hi):
                return cl._total(*cl._chunk_loss(h @ w.t(), tgt.select(slice(lo, hi)), lab[lo:hi], spec_),
                                 rows.shape[0], spec_)
            total = total + checkpoint(one, rows[lo:hi], w, use_reentrant=False)
        return total

    return {"full": full, "fused": fused, "recompute": recompute}[spec["variant"]]


def _online_step_fn(spec, model, teacher, input_ids):
    """Row 9f: one `train.online` step's loss, as Trainer.targets_for + loss_step compute it."""
    import torch

    from raydistill import chunked_loss as cl
    from raydistill.losses import distill_loss
    from raydistill.targets import from_logits
    from raydistill.train import _clone_targets

    labels, width = input_ids[:, 1:], spec["vocab"]
    kw = dict(alpha=0.5, temperature=1.0, loss="forward_kl")

    def full():
        with torch.inference_mode():
            targets = from_logits(teacher(input_ids=input_ids).logits[:, :-1, :width].float(), labels)
        return distill_loss(model(input_ids=input_ids).logits[:, :-1], _clone_targets(targets), labels, **kw)[0]

    def fused():
        with torch.no_grad():
            t_hidden, t_w, t_b = cl.model_hidden(teacher, input_ids)
        head = cl.TeacherHead.cut(t_hidden[:, :-1], t_w, t_b, width)
        hidden, w, b = cl.model_hidden(model, input_ids)
        return cl.fused_distill_loss(hidden[:, :-1], w, head, labels, bias=b, chunk_tokens=spec["chunk_tokens"],
                                     **kw)[0]

    return {"full": full, "fused": fused}[spec["variant"]]


def _teacher_pass_fn(spec, model, input_ids):
    import torch

    from raydistill import chunked_loss as cl
    from raydistill.targets import encode

    kw = dict(fmt=spec["fmt"], k=32, samples=50, capture_temperature=1.0, vocab_size=spec["vocab"])

    def full():
        with torch.inference_mode():
            return encode(model(input_ids=input_ids).logits, input_ids, generator=torch.Generator().manual_seed(0),
                          **kw)

    def chunked():
        with torch.inference_mode():
            hidden, w, b = cl.model_hidden(model, input_ids)
            return cl.encode_chunked(hidden, w, input_ids, bias=b, chunk_tokens=spec["chunk_tokens"],
                                     generator=torch.Generator().manual_seed(0), **kw)

    return {"full": full, "chunked": chunked}[spec["variant"]]


def child(spec: dict) -> dict:
    import gc

    import torch

    torch.set_num_threads(spec.get("threads", 1))
    bsz, seq = spec["batch"], spec["seq_len"]
    model = _llama(spec["vocab"], spec["hidden"], seed=0)
    input_ids = torch.randint(0, spec["vocab"], (bsz, seq), generator=torch.Generator().manual_seed(1))
    if spec["kind"] in ("train", "online"):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        if spec["kind"] == "train":
            loss_fn = _train_step_fn(spec, model, input_ids, _topk_targets(bsz, seq - 1, spec["vocab"], 32, seed=2))
        else:  # the teacher's weights are part of the baseline, like the student's state
            teacher = _llama(spec["vocab"], spec["teacher_hidden"], seed=3).eval()
            loss_fn = _online_step_fn(spec, model, teacher, input_ids)

        def step():
            loss = loss_fn()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=False)  # gradients stay allocated: part of the baseline
            return float(loss)
    else:
        model.eval()
        step = _teacher_pass_fn(spec, model, input_ids)
    step()  # warm-up: gradients, optimizer state, lazy allocations
    gc.collect()
    base = _status_mib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    step()
    peak = _status_mib("VmHWM")
    times = []
    for _ in range(spec["steps"]):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"base_mib": base, "peak_mib": peak, "extra_mib": peak - base,
            "step_s": statistics.median(times) if times else None}


# ------------------------------------------------------------------------------------ parent side

def measure(spec: dict, timeout_s: float = 900) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([BENCH, ROOT]), MALLOC_MMAP_THRESHOLD_="65536",
               OMP_NUM_THREADS=str(spec.get("threads", 1)))
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout_s)
    if out.returncode != 0:
        raise RuntimeError(f"child {spec} failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare(base: dict, variant_a: str, variant_b: str, repeats: int) -> dict:
    """Variant b against variant a of the same spec: `compare_specs`."""
    return compare_specs(dict(base, variant=variant_a), dict(base, variant=variant_b), repeats)


def compare_specs(spec_a: dict, spec_b: dict, repeats: int) -> dict:
    """A B A B ... children; median extra-peak and step-time ratios b / a, and the raw figures."""
    runs = {"a": [], "b": []}
    for _ in range(repeats):
        for key, spec in (("a", spec_a), ("b", spec_b)):
            runs[key].append(measure(spec))
    mem = [b["extra_mib"] / a["extra_mib"] for a, b in zip(runs["a"], runs["b"])]
    speed = [a["step_s"] / b["step_s"] for a, b in zip(runs["a"], runs["b"])]
    med = lambda v, k: statistics.median(r[k] for r in runs[v])  # noqa: E731
    return {"mem_ratio": statistics.median(mem), "speed_ratio": statistics.median(speed),
            "a_extra_mib": med("a", "extra_mib"), "b_extra_mib": med("b", "extra_mib"),
            "a_step_s": med("a", "step_s"), "b_step_s": med("b", "step_s"), "runs": runs}


ROW9_SPEC = dict(hidden=32, batch=2, seq_len=257, chunk_tokens=None)  # 512 loss tokens


def run_row_9(sizes, work: str, details: dict) -> list:
    """Rows 9a-9f (see the module docstring); figures kept in details["row9"] (9f: details["row9f"])."""
    from common import Row, judge, log

    from raydistill.chunked_loss import chunk_tokens_for

    quick = sizes.name == "quick"
    repeats, steps = (2, 1) if quick else (3, 3)
    base = dict(ROW9_SPEC, steps=steps)
    log(f"row 9: train step at V={V128:,}, full vs fused, {repeats} interleaved repeats")
    train = compare(dict(base, kind="train", vocab=V128), "full", "fused", repeats)
    log("row 9: teacher pass (sampled N=50), full logits vs encode_chunked")
    teacher_base = dict(base, kind="teacher", fmt="sampled")
    teacher = compare(dict(teacher_base, vocab=V128), "full", "chunked", repeats)
    log("row 9: growth 32,000 -> 262,144: fused step, chunked teacher pass (interleaved)")
    growth = compare_specs(dict(base, kind="train", vocab=32_000, variant="fused"),
                           dict(base, kind="train", vocab=262_144, variant="fused"), repeats)
    t_growth = compare_specs(dict(teacher_base, vocab=32_000, variant="chunked"),
                             dict(teacher_base, vocab=262_144, variant="chunked"), repeats)
    details["row9"] = {"train": train, "teacher": teacher, "growth": growth, "teacher_growth": t_growth,
                       "spec": base}
    head_mib = (262_144 - 32_000) * base["hidden"] * 4 / 2**20  # one float32 copy of the head's growth
    tokens = base["batch"] * (base["seq_len"] - 1)

    def growth_row(row, what, g):
        a, b = g["a_extra_mib"], g["b_extra_mib"]
        return Row(row, what, a, b, "MiB", g["mem_ratio"], "flat beyond weights", "info",
                   f"growth {b - a:.0f} MiB (medians of {repeats} interleaved pairs); one float32 copy of the "
                   f"head's growth is {head_mib:.0f} MiB; chunk {chunk_tokens_for(32_000)} -> "
                   f"{chunk_tokens_for(262_144)} tokens (auto: the same logits per chunk)")

    return [
        Row("9a", f"train step extra peak, fused vs full logits (V={V128:,}, {tokens} tokens, tiny Llama)",
            train["a_extra_mib"], train["b_extra_mib"], "MiB", train["mem_ratio"], "<= 0.3",
            judge(train["mem_ratio"], "<=", 0.3), f"chunk {chunk_tokens_for(V128)} tokens (auto); "
            f"full path {train['a_extra_mib'] / tokens:.2f} MiB/token"),
        Row("9b", "train step speed, fused vs full (full s / fused s)", train["a_step_s"], train["b_step_s"],
            "s", train["speed_ratio"], ">= 0.9", judge(train["speed_ratio"], ">=", 0.9),
            "loaded 2-core machine: medians of interleaved children"),
        Row("9c", f"teacher pass extra peak, encode_chunked vs full logits (V={V128:,})", teacher["a_extra_mib"],
            teacher["b_extra_mib"], "MiB", teacher["mem_ratio"], "<= 0.3", judge(teacher["mem_ratio"], "<=", 0.3),
            f"pass speed ratio {teacher['speed_ratio']:.2f}; full path {teacher['a_extra_mib'] / tokens:.2f} "
            "MiB/token"),
        growth_row("9d", "fused train step extra peak, V=262,144 vs 32,000", growth),
        growth_row("9e", "chunked teacher pass extra peak, V=262,144 vs 32,000", t_growth),
        run_row_9f(base, repeats, details),
    ]


def run_row_9f(base: dict, repeats: int, details: dict):
    """Row 9f: one train.online step (teacher forward inside), fused vs full logits; details["row9f"]."""
    from common import Row, judge, log

    from raydistill.chunked_loss import chunk_tokens_for

    log(f"row 9f: online train step at V={V128:,}, full vs fused (teacher head per chunk), {repeats} interleaved "
        "repeats")
    online = compare(dict(base, kind="online", vocab=V128, teacher_hidden=ONLINE_TEACHER_HIDDEN), "full", "fused",
                     repeats)
    details["row9f"] = dict(online, spec=dict(base, teacher_hidden=ONLINE_TEACHER_HIDDEN))
    tokens = base["batch"] * (base["seq_len"] - 1)
    return Row("9f", f"online train step extra peak, fused vs full logits (V={V128:,}, {tokens} tokens, tiny "
               "Llama teacher + student)", online["a_extra_mib"], online["b_extra_mib"], "MiB", online["mem_ratio"],
               "<= 0.3", judge(online["mem_ratio"], "<=", 0.3),
               f"chunk {chunk_tokens_for(V128)} tokens (auto); speed ratio {online['speed_ratio']:.2f}; full path "
               f"{online['a_extra_mib'] / tokens:.2f} MiB/token")


# ------------------------------------------------------------------------------ what fits where

# (name, params, hidden, layers) of the configs' models; every one has the 128,256-id Llama-3 vocabulary.
MODELS = {"student": ("Llama-3.2-1B", 1.24e9, 2048, 16), "teacher": ("Llama-3-8B", 8.03e9, 4096, 32)}
GPUS_GIB = (24, 40, 80, 141)


def fit_table(result: dict) -> str:
    """Max tokens per micro-batch (student) / per teacher batch on one GPU, from row 9's figures.

    Measured (row 9, V = 128,256): the extra peak per token of today's loss (full logits) and of a
    teacher pass with full logits; the fused / chunked paths' extra peak, which does not grow with
    tokens (one chunk). Computed, not measured here: model state = 16 B/param for a student
    (float32 weights + grads + AdamW) and 2 B/param for a bf16 teacher; student activations per
    token = 34 * hidden * layers bytes (Korthikanti et al. 2022, bf16, no recompute) or
    2 * hidden * layers (gradient checkpointing: one bf16 layer input kept per layer); 10% headroom.
    """
    r9 = result["details"]["row9"]
    tokens = r9["spec"]["batch"] * (r9["spec"]["seq_len"] - 1)
    mib = 2 ** 20
    full_tok = r9["train"]["a_extra_mib"] * mib / tokens      # B/token, full logits, student step
    fused_fixed = r9["train"]["b_extra_mib"] * mib            # B, one chunk
    t_full_tok = r9["teacher"]["a_extra_mib"] * mib / tokens  # B/token, teacher pass with full logits
    t_fixed = r9["teacher"]["b_extra_mib"] * mib
    name_s, p_s, h_s, l_s = MODELS["student"]
    name_t, p_t, h_t, l_t = MODELS["teacher"]
    lines = ["| GPU | student " + name_s + ": full logits | fused loss | fused + gradient checkpointing | "
             "teacher " + name_t + " bf16: full logits | encode_chunked |", "|---|---|---|---|---|---|"]

    def cap(free, per_tok, fixed=0.0):
        n = (free - fixed) / per_tok
        return "does not fit" if n < 1 else f"{int(n):,}"

    for gib in GPUS_GIB:
        usable = gib * 2 ** 30 * 0.9
        s_free, t_free = usable - 16 * p_s, usable - 2 * p_t
        act, act_ckpt = 34 * h_s * l_s, 2 * h_s * l_s
        t_act = 4 * h_t  # a teacher pass keeps one layer's activations, ~ a few hidden vectors per token
        lines.append(f"| {gib} GiB | {cap(s_free, full_tok + act)} | {cap(s_free, act, fused_fixed)} | "
                     f"{cap(s_free, act_ckpt, fused_fixed)} | {cap(t_free, t_full_tok + t_act)} | "
                     f"{cap(t_free, t_act, t_fixed)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", help="internal: run one measurement from a JSON spec")
    ap.add_argument("--sweep", action="store_true", help="fused step time and extra peak over chunk sizes")
    ap.add_argument("--row", choices=["9f"], help="run one row alone and print its figures as JSON")
    ap.add_argument("--repeats", type=int, default=3, help="with --row: interleaved A B pairs (default 3)")
    ap.add_argument("--steps", type=int, default=1, help="with --row: timed steps per child (default 1)")
    ap.add_argument("--fit-table", metavar="RESULTS_JSON", help="print the README's what-fits table from a "
                    "bench JSON holding row 9")
    args = ap.parse_args(argv)
    if args.fit_table:
        with open(args.fit_table) as f:
            print(fit_table(json.load(f)))
        return 0
    if args.child:
        sys.path[:0] = [ROOT]
        print(json.dumps(child(json.loads(args.child))))
        return 0
    if args.row == "9f":
        sys.path[:0] = [BENCH, ROOT]
        details: dict = {}
        row = run_row_9f(dict(ROW9_SPEC, steps=args.steps), args.repeats, details)
        print(json.dumps({"row": dataclasses.asdict(row), "details": details["row9f"]}, default=str))
        return 0
    if args.sweep:
        base = dict(kind="train", vocab=V128, hidden=32, batch=4, seq_len=257, steps=3)
        for chunk in (64, 128, 256, 512, 1024):
            r = compare(dict(base, chunk_tokens=chunk), "full", "fused", repeats=1)
            print(json.dumps({k: v for k, v in r.items() if k != "runs"} | {"chunk": chunk}), flush=True)
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
