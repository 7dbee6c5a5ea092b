"""The embedded default run: an offline corpus, tokenizer and cached demo teacher.

`python jobs/distill.py` with no config needs a teacher that is genuinely better than what the
student reaches alone, with no network. It builds one from what every Python install has:

* corpus: the standard library's own source (6 MB of ~2-4 KB pieces, tests and generated tables
  excluded, in a hashed order), a Parquet file;
* tokenizer: byte-level BPE with a 2,048 vocabulary trained on that corpus;
* teacher: GPT-2 4 layers x 256 trained on the rows the student never sees, for 256 steps or
  200 s (whichever first; the cosine schedule shrinks to the steps that fit);
* student: 2 layers x 128 built from the teacher's config (`student.init_from_teacher`), 220 DDP
  steps on 2 workers, `sampled` targets (N = 50) with alpha 0.5 — and the same student on hard
  labels alone (`run.compare_hard_labels`) for the report.

All of it is cached under `$RAYDISTILL_CACHE` (default ~/.cache/raydistill/demo), keyed by the
recipe, so a second run starts at the teacher pass. Why these numbers: a 2-core prototype
(../shared/notes/soft-targets.md) showed that a teacher trained too briefly makes distillation
worse than hard labels, that `sampled` targets with 0 < alpha < 1 beat both, and that renormalised
top-k with alpha 1 can be far worse than no teacher. The measured outcome of this recipe (held-out
cross-entropy of teacher, distilled and hard-label students) is in the README and every run's
report.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass

from .fsutil import atomic_write

EOS = "<|endoftext|>"
_FORMAT_VERSION = 1  # bump when the corpus/tokenizer/teacher build changes in a way the keys can't see

DEFAULT_CACHE = os.path.expanduser(os.path.join("~", ".cache", "raydistill", "demo"))

# Directories of the standard library that are not "ordinary source": tests, installed third-party
# packages, generated tables (encodings' charmaps, pydoc's topic dump).
_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "pydoc_data",
                        "encodings", "__pycache__", "_bundled"})


def cache_dir_default() -> str:
    """`$RAYDISTILL_CACHE` if set, else `~/.cache/raydistill/demo`."""
    return os.path.expanduser(os.environ.get("RAYDISTILL_CACHE") or DEFAULT_CACHE)


def _resolve(cache_dir: str | None) -> str:
    d = os.path.abspath(os.path.expanduser(cache_dir or cache_dir_default()))
    os.makedirs(d, exist_ok=True)
    return d


def _key(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _log(msg: str) -> None:
    print(f"[raydistill.demo] {msg}", flush=True)


# ----------------------------------------------------------------------------------------- corpus

DEFAULT_CORPUS_BYTES = 6_000_000
CHUNK_MIN = 2048   # a document ends at the first top-level statement after this many characters
CHUNK_MAX = 4096   # ... or at any line boundary after this many


def _stdlib_files(root: str) -> list[str]:
    """Relative paths of the stdlib's *.py files, sorted (deterministic), tests etc. excluded."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("config-"))
        for name in filenames:
            if not name.endswith(".py") or name.startswith(("test_", "_sysconfigdata")):
                continue
            out.append(os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/"))
    return sorted(out)


def _split_source(text: str) -> list[str]:
    """Cut one file into documents of ~2-4 KB at top-level statement boundaries."""
    docs, cur, size = [], [], 0
    for line in text.splitlines(keepends=True):
        top = bool(line) and not line[0].isspace() and line[0] not in ")]}#"
        if cur and ((size >= CHUNK_MIN and top) or size + len(line) > CHUNK_MAX):
            docs.append("".join(cur))
            cur, size = [], 0
        cur.append(line)
        size += len(line)
    if cur:
        docs.append("".join(cur))
    return [d for d in docs if d.strip()]


def _corpus_docs(root: str, max_bytes: int) -> list[str]:
    """Every document of the stdlib, in a deterministic pseudo-random order, capped at max_bytes.

    The order is the sha256 of (file, chunk index): a prefix of the corpus (what `data.max_rows`
    reads) is a sample of the whole library rather than its alphabetically first packages."""
    keyed = []
    for rel in _stdlib_files(root):
        try:
            with open(os.path.join(root, rel), "rb") as f:
                text = f.read().decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        text = text.replace("\r\n", "\n")
        for i, doc in enumerate(_split_source(text)):
            keyed.append((hashlib.sha256(f"{rel}#{i}".encode()).hexdigest(), doc))
    keyed.sort()
    docs, total = [], 0
    for _, doc in keyed:
        n = len(doc.encode("utf-8"))
        if total + n > max_bytes:
            break
        docs.append(doc)
        total += n
    return docs


def demo_corpus(cache_dir: str | None = None, *, max_bytes: int = DEFAULT_CORPUS_BYTES) -> str:
    """Parquet file (column `text`) of Python standard-library source, built once and cached.

    Documents are ~2-4 KB pieces of the stdlib's *.py files (tests, site-packages, generated
    tables excluded) cut at top-level statements, in a deterministic hashed order, at most
    `max_bytes` of utf-8 text in all. Same interpreter + same `max_bytes` -> same bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    cache = _resolve(cache_dir)
    root = sysconfig.get_paths()["stdlib"]
    key = _key({"v": _FORMAT_VERSION, "python": sys.version, "max_bytes": int(max_bytes),
                "chunk": [CHUNK_MIN, CHUNK_MAX], "skip": sorted(_SKIP_DIRS)})
    path = os.path.join(cache, f"corpus-{key}.parquet")
    if os.path.exists(path):
        return path
    t0 = time.time()
    docs = _corpus_docs(root, int(max_bytes))
    if not docs:
        raise RuntimeError(f"no Python sources found under the standard library at {root}")
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"text": pa.array(docs, pa.string())}), sink, compression="zstd", row_group_size=1024)
    atomic_write(path, sink.getvalue().to_pybytes())
    _log(f"corpus: {len(docs)} documents, {sum(map(len, docs)) / 1e6:.1f} MB of stdlib source "
         f"-> {path} ({time.time() - t0:.1f}s)")
    return path


def _read_texts(corpus_path: str) -> list[str]:
    import pyarrow.parquet as pq

    return pq.read_table(corpus_path, columns=["text"]).column("text").to_pylist()


# -------------------------------------------------------------------------------------- tokenizer

DEFAULT_VOCAB = 2048


def demo_tokenizer(cache_dir: str | None, corpus_path: str, *, vocab_size: int = DEFAULT_VOCAB) -> str:
    """Byte-level BPE (vocab `vocab_size`) trained on the corpus; an HF tokenizer dir, cached.

    eos = bos = unk = pad = "<|endoftext|>" (id 0)."""
    cache = _resolve(cache_dir)
    key = _key({"v": _FORMAT_VERSION, "corpus": _file_sha256(corpus_path), "vocab": int(vocab_size)})
    out = os.path.join(cache, f"tokenizer-{key}")
    if os.path.isdir(out):
        return out
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t0 = time.time()
    texts = _read_texts(corpus_path)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=int(vocab_size), special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer, length=len(texts))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=EOS,
                                   pad_token=EOS)
    tmp = tempfile.mkdtemp(prefix=".tokenizer-", dir=cache)
    try:
        fast.save_pretrained(tmp)
        _replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _log(f"tokenizer: byte-level BPE, vocab {len(fast)} -> {out} ({time.time() - t0:.1f}s)")
    return out


def _replace_dir(tmp: str, out: str) -> None:
    """Atomically publish `tmp` as `out`; if another process published it first, keep theirs."""
    try:
        os.rename(tmp, out)
    except OSError:
        if not os.path.isdir(out):
            raise


# ----------------------------------------------------------------------------------------- recipe

@dataclass(frozen=True)
class DemoRecipe:
    """Every number of the embedded default run (see the module docstring for the evidence).

    The pipeline reads the first `student_rows` corpus rows (`data.max_rows`); the teacher is trained
    on the rows after them, so it has never seen the student's training or held-out sequences."""
    # corpus and tokenizer
    corpus_bytes: int = DEFAULT_CORPUS_BYTES
    vocab_size: int = DEFAULT_VOCAB
    seq_len: int = 128
    student_rows: int = 256
    # teacher (trained here, by demo_teacher)
    teacher_layers: int = 4
    teacher_embd: int = 256
    teacher_heads: int = 4
    teacher_steps: int = 256
    teacher_batch: int = 16
    teacher_lr: float = 3e-3
    teacher_warmup: int = 30
    teacher_budget_s: float = 200.0
    teacher_eval_seqs: int = 32
    seed: int = 0
    # student (trained by the pipeline; not part of the teacher's cache key)
    student_layers: int = 2
    student_embd: int = 128
    student_heads: int = 2
    student_steps: int = 220
    student_batch: int = 8          # per worker; 2 workers -> global batch 16
    student_epochs: int = 10
    student_lr: float = 3e-3
    student_warmup: int = 20
    alpha: float = 0.5
    eval_fraction: float = 0.1

    def teacher_key(self) -> dict:
        """The fields that shape the teacher: changing any of them trains a new one."""
        keep = ("corpus_bytes", "vocab_size", "seq_len", "student_rows", "teacher_layers", "teacher_embd",
                "teacher_heads", "teacher_steps", "teacher_batch", "teacher_lr", "teacher_warmup",
                "teacher_eval_seqs", "seed")
        return {k: getattr(self, k) for k in keep}


RECIPE = DemoRecipe()


# ---------------------------------------------------------------------------------------- teacher

def _teacher_sequences(texts: list[str], tokenizer, seq_len: int, need: int):
    """Pack documents (each followed by EOS, like `raydistill.data`) into `need` windows at most."""
    import torch

    eos = tokenizer.eos_token_id
    ids: list[int] = []
    batch = 64
    for i in range(0, len(texts), batch):
        for doc in tokenizer(texts[i:i + batch], add_special_tokens=False)["input_ids"]:
            ids.extend(doc)
            ids.append(eos)
        if len(ids) >= need * seq_len:
            break
    n = min(need, len(ids) // seq_len)
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def _lr_at(step: int, total: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def _is_model_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json")) and os.path.isfile(
        os.path.join(path, "model.safetensors"))


def demo_teacher(cache_dir: str | None = None, *, recipe: DemoRecipe = RECIPE,
                 budget_s: float | None = None) -> str:
    """A GPT-2-style teacher trained on the demo corpus; an HF model dir (safetensors + tokenizer).

    Cached at `<cache_dir>/teacher-<key>/`, key = hash of the teacher's recipe, the corpus and the
    tokenizer: a finished teacher is returned at once, a changed recipe trains a new one. Training
    happens in a temporary directory renamed into place when done, so an interrupted run leaves
    nothing that looks finished. Training stops at `recipe.teacher_steps` or after `budget_s`
    seconds (default `recipe.teacher_budget_s`), whichever comes first; on a slow machine the
    cosine schedule is shortened to the steps that fit, so the teacher still ends annealed."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    cache = _resolve(cache_dir)
    budget = float(recipe.teacher_budget_s if budget_s is None else budget_s)
    corpus = demo_corpus(cache, max_bytes=recipe.corpus_bytes)
    tok_dir = demo_tokenizer(cache, corpus, vocab_size=recipe.vocab_size)
    with open(os.path.join(tok_dir, "tokenizer.json"), "rb") as f:
        tok_hash = hashlib.sha256(f.read()).hexdigest()
    key = _key({"v": _FORMAT_VERSION, "recipe": recipe.teacher_key(), "corpus": _file_sha256(corpus),
                "tokenizer": tok_hash})
    out = os.path.join(cache, f"teacher-{key}")
    if _is_model_dir(out):
        _warn_if_cut_short(out)
        return out

    t0 = time.time()
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    texts = _read_texts(corpus)[recipe.student_rows:]
    need = recipe.teacher_steps * recipe.teacher_batch + recipe.teacher_eval_seqs
    seqs = _teacher_sequences(texts, tokenizer, recipe.seq_len, need)
    n_eval = min(recipe.teacher_eval_seqs, len(seqs) // 4)
    if len(seqs) - n_eval < recipe.teacher_batch:
        raise RuntimeError(f"the demo corpus {corpus} has too little text after row {recipe.student_rows} "
                           f"to train the teacher ({len(seqs)} sequences of {recipe.seq_len} tokens)")
    train, held_out = seqs[: len(seqs) - n_eval], seqs[len(seqs) - n_eval:]
    eos = tokenizer.eos_token_id
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=recipe.seq_len, n_layer=recipe.teacher_layers,
                        n_embd=recipe.teacher_embd, n_head=recipe.teacher_heads, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=eos, eos_token_id=eos,
                        pad_token_id=eos)
    torch.manual_seed(recipe.seed)
    model = GPT2LMHeadModel(config)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.teacher_lr, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(recipe.seed)
    _log(f"teacher: training GPT-2 {recipe.teacher_layers} layers x {recipe.teacher_embd} "
         f"({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params) on {len(train)} sequences "
         f"of {recipe.seq_len} tokens, up to {recipe.teacher_steps} steps of {recipe.teacher_batch} "
         f"within {budget:.0f}s (prepared in {time.time() - t0:.1f}s)")
    model.train()
    total, order, pos, step, ema = recipe.teacher_steps, torch.empty(0, dtype=torch.long), 0, 0, None
    start = last_log = time.time()
    cpu0 = time.process_time()
    while step < total:
        elapsed = time.time() - start
        if elapsed >= budget:
            _log(f"teacher: time budget of {budget:.0f}s reached at step {step}")
            break
        if step >= 10 and step % 10 == 0:  # fit the schedule to the budget on a slow machine
            fit = step + int((budget - elapsed) / (elapsed / step))
            total = max(step + 1, min(recipe.teacher_steps, fit))
        if pos + recipe.teacher_batch > len(order):
            order, pos = torch.randperm(len(train), generator=gen), 0
        x = train[order[pos:pos + recipe.teacher_batch]]
        pos += recipe.teacher_batch
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, total, recipe.teacher_lr, recipe.teacher_warmup)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        value = loss.item()
        ema = value if ema is None else 0.9 * ema + 0.1 * value
        if time.time() - last_log >= 15 or step == total:
            last_log = time.time()
            rate = step / (last_log - start)
            _log(f"teacher: step {step}/{total} loss {ema:.3f} elapsed {last_log - start:.0f}s "
                 f"ETA {(total - step) / rate:.0f}s")
    model.eval()
    with torch.no_grad():
        ce = float(model(input_ids=held_out, labels=held_out).loss) if len(held_out) else float("nan")
    train_s, cpu_s = time.time() - start, time.process_time() - cpu0
    _log(f"teacher: {step} steps in {train_s:.0f}s (CPU {cpu_s:.0f}s), held-out cross-entropy {ce:.3f}")

    tmp = tempfile.mkdtemp(prefix=".teacher-", dir=cache)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, "raydistill_demo.json"), "w") as f:
            json.dump({"recipe": dataclasses.asdict(recipe), "steps": step, "planned_steps": recipe.teacher_steps,
                       "train_seconds": round(train_s, 1), "train_cpu_seconds": round(cpu_s, 1),
                       "held_out_ce": ce, "held_out_sequences": len(held_out),
                       "train_sequences": len(train), "corpus": corpus, "tokenizer": tok_dir}, f, indent=1)
        _replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _log(f"teacher: saved {out} ({time.time() - t0:.0f}s in all)")
    return out


def _warn_if_cut_short(out: str) -> None:
    """A teacher trained on a busy machine may have stopped at its time budget, far short of its
    steps (seen: 26 of 256 at load 15), and the cache keeps it: say so on every reuse."""
    try:
        with open(os.path.join(out, "raydistill_demo.json")) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return
    if meta.get("steps", 0) < meta.get("planned_steps", 0):
        _log(f"WARNING teacher: the cached teacher {out} stopped at its time budget after {meta['steps']} of "
             f"{meta['planned_steps']} steps (held-out cross-entropy {meta.get('held_out_ce', float('nan')):.3f}); "
             "delete that directory and re-run on a quieter machine for the README's figures")


# ------------------------------------------------------------------------------ the embedded config

def default_config(cache_dir: str | None = None, *, recipe: DemoRecipe = RECIPE) -> dict:
    """The embedded run of `python jobs/distill.py`: builds (or reuses) corpus, tokenizer, teacher."""
    cache = _resolve(cache_dir)
    corpus = demo_corpus(cache, max_bytes=recipe.corpus_bytes)
    teacher = demo_teacher(cache, recipe=recipe)
    return {
        "run": {"name": "demo", "output_dir": "runs/demo", "seed": 0, "compare_hard_labels": True},
        "data": {"path": corpus, "text_column": "text", "seq_len": recipe.seq_len,
                 "eval_fraction": recipe.eval_fraction, "max_rows": recipe.student_rows},
        "teacher": {"model": teacher, "replicas": 2, "cpus_per_replica": 1.0, "batch_size": 16},
        "targets": {"format": "sampled", "samples": 50, "shard_rows": 128},
        "student": {"init_from_teacher": {"n_layer": recipe.student_layers, "n_embd": recipe.student_embd,
                                          "n_head": recipe.student_heads}},
        "train": {"workers": 2, "cpus_per_worker": 1.0, "epochs": recipe.student_epochs,
                  "max_steps": recipe.student_steps, "batch_size": recipe.student_batch, "lr": recipe.student_lr,
                  "warmup_steps": recipe.student_warmup, "alpha": recipe.alpha, "temperature": 1.0,
                  "checkpoint_every": 100},
        "refresh": {"policy": "none"},
    }
