"""The embedded default run: an offline corpus, tokenizer and cached demo teacher.

PLACEHOLDER DOCSTRING (filled in once the recipe is measured).
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
    table = pa.table({"text": pa.array(docs, pa.string())})
    fd, tmp = tempfile.mkstemp(prefix=".corpus-", suffix=".tmp", dir=cache)
    os.close(fd)
    try:
        pq.write_table(table, tmp, compression="zstd", row_group_size=1024)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
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
