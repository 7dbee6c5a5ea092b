"""Shared pieces of the benchmark: environment, sizes, offline assets, configs, timing, the table.

Assets (built once, cached under bench/results/tmp/cache, which git ignores):
  corpus        Python standard-library source as Parquet (`raydistill.demo.demo_corpus`)
  tok-2048      byte-level BPE of that corpus (`raydistill.demo.demo_tokenizer`), rows 1-4 and 6
  tok-32000     the same at a 32k vocabulary (uint16 ids), row 5
  teacher-*     GPT-2 teachers built from config (safetensors + tokenizer, like a hub checkpoint)
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
TMP = os.path.join(BENCH, "results", "tmp")
CACHE = os.path.join(TMP, "cache")

ENV = {
    # Local Ray binds to loopback, no auth token, no telemetry (shared machine; see notes/ray.md).
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_TRAIN_V2_ENABLED": "1",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "TRANSFORMERS_VERBOSITY": "error",
    # A busy shared machine can take more than the default 10 s to register the raylet.
    "RAY_raylet_start_wait_time_s": "120",
}


def setup_env() -> None:
    """Before Ray or transformers are imported anywhere."""
    for k, v in ENV.items():
        os.environ.setdefault(k, v)
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@dataclass
class Sizes:
    """Every size of one bench mode (quick: minutes on 2 busy cores; full: a longer, steadier run)."""
    name: str
    corpus_bytes: int = 3_000_000
    seq_len: int = 64
    # rows 1-4: a random-init GPT-2 teacher (throughput only) and its init_from_teacher student
    # (the demo's shapes: 4 x 256 teacher, 2 x 128 student)
    teacher_layers: int = 4
    teacher_embd: int = 256
    teacher_heads: int = 4
    student: dict = field(default_factory=lambda: {"n_layer": 2, "n_embd": 128, "n_head": 2})
    docs: int = 40                 # corpus rows (data.max_rows) of rows 1-4
    shard_rows: int = 32
    teacher_batch: int = 16
    train_batch: int = 16
    train_steps: int = 24          # optimizer steps of each Ray Train fit (row 3 and 4)
    log_every: int = 4
    skip_logs: int = 1             # leading history entries left out of the steady state
    fixed_repeats: int = 3         # A B pairs of row 1b (input build vs plain)
    fit_repeats: int = 2           # A B pairs of row 3b (a fit, then a plain loop)
    plain_steps: int = 12          # steps of the plain loops (the first is a warm-up)
    replicas: tuple = (1, 2)       # row 2 (plus N = cores)
    # row 5: a 32k-vocabulary teacher, briefly trained
    v32_layers: int = 2
    v32_embd: int = 32
    v32_heads: int = 2
    v32_steps: int = 300           # training steps in all (cached; resumed by the next run if cut short)
    v32_train_s: float = 60.0      # at most this long per bench run
    v32_train_batch: int = 8
    v32_train_seq: int = 32
    v32_lr: float = 1e-2
    v32_student_at: float = 0.2    # the "student" is the teacher's checkpoint at this share of training
    v32_store_seqs: int = 32       # sequences in the measured shard (bytes/token)
    v32_fid_seqs: int = 8          # sequences for the fidelity measures (dense [n, V] tensors)
    sampled_n: tuple = (8, 50, 200)
    topk_k: tuple = (8, 32, 128)
    llm_entropy: float = 2.5       # nats: the sharpened-teacher check of row 5
    # row 6: corpus sizes 1x and 4x
    mem_docs: int = 8
    mem_steps: int = 6
    mem_interval_s: float = 0.2


QUICK = Sizes(name="quick")
FULL = Sizes(name="full", seq_len=128, teacher_layers=6, teacher_embd=384, teacher_heads=6,
             student={"n_layer": 2, "n_embd": 192, "n_head": 3}, docs=200, shard_rows=64,
             train_steps=120, log_every=10, skip_logs=2, plain_steps=60, replicas=(1, 2, 4),
             v32_layers=2, v32_embd=64, v32_heads=2, v32_train_s=600.0, v32_steps=2000, v32_lr=5e-3,
             v32_train_seq=64,
             v32_store_seqs=128, v32_fid_seqs=16, mem_docs=40, mem_steps=20)


# ---------------------------------------------------------------------------------- assets

def _key(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def corpus_and_tokenizer(sizes: Sizes, vocab: int) -> tuple[str, str]:
    from raydistill import demo

    corpus = demo.demo_corpus(CACHE, max_bytes=sizes.corpus_bytes)
    return corpus, demo.demo_tokenizer(CACHE, corpus, vocab_size=vocab)


def gpt2_dir(tok_dir: str, *, n_layer: int, n_embd: int, n_head: int, n_positions: int, seed: int,
             tag: str) -> str:
    """A random-init GPT-2 saved like a hub checkpoint (cached by its shape)."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel
    import torch

    out = os.path.join(CACHE, f"{tag}-{_key([tok_dir, n_layer, n_embd, n_head, n_positions, seed])}")
    if os.path.exists(os.path.join(out, "model.safetensors")):
        return out
    tok = AutoTokenizer.from_pretrained(tok_dir)
    torch.manual_seed(seed)
    eos = tok.eos_token_id
    cfg = GPT2Config(vocab_size=len(tok), n_layer=n_layer, n_embd=n_embd, n_head=n_head,
                     n_positions=n_positions, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    tmp = out + f".tmp-{os.getpid()}"
    GPT2LMHeadModel(cfg).save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    import shutil

    shutil.rmtree(out, ignore_errors=True)  # an interrupted earlier build
    os.replace(tmp, out)
    return out


# ---------------------------------------------------------------------------------- configs

def bench_config(sizes: Sizes, *, teacher: str, corpus: str, out_dir: str, name: str, docs: int | None = None,
                 **over) -> "object":
    """A checked raydistill Config for one bench run; `over` = {"train.online": True, ...}."""
    from raydistill.config import Config

    d = {
        "run": {"name": name, "output_dir": out_dir, "seed": 0},
        "data": {"path": corpus, "text_column": "text", "seq_len": sizes.seq_len, "eval_fraction": 0.0,
                 "max_rows": docs or sizes.docs},
        "teacher": {"model": teacher, "replicas": cores(), "cpus_per_replica": 1.0,
                    "batch_size": sizes.teacher_batch},
        "targets": {"format": "sampled", "samples": 50, "shard_rows": sizes.shard_rows},
        "student": {"init_from_teacher": dict(sizes.student)},
        "train": {"workers": 1, "cpus_per_worker": float(cores()), "epochs": 1, "max_steps": sizes.train_steps,
                  "batch_size": sizes.train_batch, "lr": 1e-3, "warmup_steps": 5, "alpha": 0.5,
                  "log_every": sizes.log_every, "checkpoint_every": 100_000, "max_failures": 0},
        "refresh": {"policy": "none"},
    }
    for key, value in over.items():
        node = d
        *path, last = key.split(".")
        for p in path:
            node = node.setdefault(p, {})
        node[last] = value
    return Config.from_dict(d)


def init_ray(num_cpus: int = 8, attempts: int = 3) -> None:
    import ray
    from ray.data import DataContext

    for attempt in range(attempts):
        if ray.is_initialized():
            break
        try:
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                     runtime_env={"env_vars": {k: v for k, v in ENV.items() if not k.startswith("RAY_ENABLE")}})
        except Exception as e:  # noqa: BLE001 - a busy machine can time out the raylet registration
            if attempt == attempts - 1:
                raise
            log(f"ray.init failed ({str(e).splitlines()[0][:120]}); retrying")
            ray.shutdown()
            time.sleep(10)
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


# ---------------------------------------------------------------------------------- numbers

def harmonic_mean(xs: list[float]) -> float:
    """Mean rate over equal amounts of work (tokens per log interval are constant)."""
    xs = [x for x in xs if x and x > 0]
    return len(xs) / sum(1.0 / x for x in xs) if xs else float("nan")


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def machine() -> dict:
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import psutil

        ram = psutil.virtual_memory().total
    except Exception:  # noqa: BLE001
        ram = None
    import ray
    import torch

    return {"nproc": cores(), "cpu_model": model, "ram_gib": round(ram / 2**30, 1) if ram else None,
            "python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__,
            "platform": platform.platform(), "gpu": "none lent to this run"}


def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


class Timer:
    def __init__(self):
        self.t = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.t


# ---------------------------------------------------------------------------------- the table

@dataclass
class Row:
    row: str
    what: str
    baseline: float | None
    measured: float | None
    unit: str
    ratio: float | None
    target: str
    status: str                    # pass | FAIL | info | not run
    note: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def judge(ratio: float | None, op: str, bound: float) -> str:
    if ratio is None or (isinstance(ratio, float) and math.isnan(ratio)):
        return "FAIL"
    return "pass" if (ratio >= bound if op == ">=" else ratio <= bound) else "FAIL"


def _fmt(x, unit: str = "") -> str:
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    if math.isnan(x):
        return "nan"
    a = abs(x)
    s = f"{x:,.0f}" if a >= 100 else f"{x:.2f}" if a >= 1 else f"{x:.3f}"
    return f"{s} {unit}".strip()


def table(rows: list[Row], markdown: bool = False) -> str:
    head = ["row", "what", "baseline", "measured", "ratio", "target", "result", "note"]
    body = [[r.row, r.what, _fmt(r.baseline, r.unit), _fmt(r.measured, r.unit),
             "-" if r.ratio is None else f"{r.ratio:.2f}", r.target, r.status, r.note] for r in rows]
    if markdown:
        esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(esc(c) for c in line) + " |" for line in body]
        return "\n".join(lines)
    short = [line[:-1] for line in body]  # notes printed under the table on a terminal
    widths = [max(len(str(x)) for x in col) for col in zip(head[:-1], *short)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*head[:-1]), fmt.format(*["-" * w for w in widths])]
    out += [fmt.format(*line) for line in short]
    notes = [f"  {r.row}: {r.note}" for r in rows if r.note]
    return "\n".join(out + (["", "notes:"] + notes if notes else []))


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)
