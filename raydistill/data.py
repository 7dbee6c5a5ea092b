"""Corpus → tokenized, packed sequences → the store's input shards.

    data.path (file, directory or glob; local or s3://, gs://, ...; Parquet or JSONL)
      └─ batches of DOCS_PER_BATCH documents → tokenize + pack (`tokenize_and_pack`) → ordered stream
           small corpus: read and packed in the driver; large: Ray Data read → map_batches per worker
           └─ driver: seq_id = position in the stream; eval split by a hash of seq_id;
              every `targets.shard_rows` train sequences → inputs/train/<shard>.parquet

Why two readers for one packing function: a Ray Data pipeline costs ~20-150 s of start-up on a
small machine (read and metadata tasks, one worker process each, each importing transformers to
load the tokenizer) — far more than tokenizing a corpus of a few MB, which takes about a second in
one process (bench row 1). Corpora up to IN_PROCESS_MAX_BYTES (or `data.max_rows` up to
IN_PROCESS_MAX_ROWS documents of Parquet) are therefore read in the driver; larger ones stream
through Ray Data. In the driver a batch is always DOCS_PER_BATCH consecutive documents in file
order; Ray Data batches within its blocks, which gives the same batches (and so the same rows) for
a one-file Parquet corpus, and may cut elsewhere across the files of a multi-file or JSONL corpus.

Packing joins the documents of one batch with EOS and cuts `seq_len` windows; the leftover
(< seq_len tokens per batch of documents) is dropped. The stream keeps its order, so the same
corpus, tokenizer and seq_len always give the same seq_ids and shards: a re-run finds the inputs
already recorded and skips this phase. Only one shard's rows are held in memory at a time.

Rows whose text is empty, not a string or not valid UTF-8 are skipped and counted (`skipped_rows`).

`data.format: chat | prompt_response` (instruction data): the task's stage is `instruct.render_batch`
instead, one example per row, no packing; its extra columns (loss_mask, length) are carried into the
input shards and the eval file beside input_ids, typed by the task's `input_schema`.
"""
from __future__ import annotations

import glob as globlib
import hashlib
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import ConfigError, StoreError
from .instruct import corpus_columns, is_examples

DOCS_PER_BATCH = 256
IN_PROCESS_MAX_BYTES = 64 << 20   # corpus files up to this size are tokenized in the driver ...
IN_PROCESS_MAX_ROWS = 100_000     # ... and so is a Parquet corpus read up to data.max_rows <= this
PARQUET_EXT = (".parquet", ".pq")
JSON_EXT = (".jsonl", ".json", ".ndjson")


# ---------------------------------------------------------------- corpus files (driver, pre-Ray)

def _filesystem(path: str):
    """(fsspec filesystem or None for local, path without protocol)."""
    if "://" not in path:
        return None, os.path.expanduser(path)
    import fsspec

    fs, stripped = fsspec.core.url_to_fs(path)
    return fs, stripped


def resolve_corpus(data_cfg) -> tuple[object, list[str], str]:
    """The corpus files and their format, or a ConfigError naming data.path and the fix."""
    path = data_cfg.path
    if not path:
        raise ConfigError(["data.path: missing — set it to a Parquet/JSONL file, directory or glob"])
    fs, p = _filesystem(path)
    if fs is None:
        if any(c in p for c in "*?["):
            files = sorted(globlib.glob(p, recursive=True))
        elif os.path.isdir(p):
            files = sorted(os.path.join(r, f) for r, _, fs_ in os.walk(p) for f in fs_)
        elif os.path.isfile(p):
            files = [p]
        else:
            raise ConfigError([f"data.path: {path} does not exist — check the path"])
    else:
        if any(c in p for c in "*?["):
            files = sorted(fs.glob(p))
        elif fs.isdir(p):
            files = sorted(f for f in fs.find(p))
        elif fs.exists(p):
            files = [p]
        else:
            raise ConfigError([f"data.path: {path} does not exist — check the URI and credentials"])
    files = [f for f in files if f.lower().endswith(PARQUET_EXT + JSON_EXT)
             and not os.path.basename(f).startswith((".", "_"))]
    if not files:
        raise ConfigError([f"data.path: no .parquet or .jsonl files at {path} — point it at the corpus"])
    kinds = {"parquet" if f.lower().endswith(PARQUET_EXT) else "json" for f in files}
    if len(kinds) > 1:
        raise ConfigError([f"data.path: {path} mixes Parquet and JSONL files — use one format"])
    fmt = kinds.pop()
    _check_text_column(fs, files, fmt, corpus_columns(data_cfg), path)
    return fs, files, fmt


def _check_text_column(fs, files: list[str], fmt: str, columns: list[tuple[str, str]], path: str) -> None:
    """The first file that has rows must have the text column (data.format chat / prompt_response:
    the messages, or prompt and response, columns: `columns` = [(key, column)]); a corpus with no
    rows is refused.

    Reads Parquet footers / the first non-blank JSONL line, file by file, until one has rows:
    usually a single small read, and an empty corpus fails here rather than after Ray starts."""
    opener = fs.open if fs is not None else open
    for f_path in files:
        if fmt == "parquet":
            with opener(f_path, "rb") as f:
                try:
                    meta = pq.ParquetFile(f).metadata
                except (pa.ArrowInvalid, OSError) as e:
                    raise ConfigError([f"data.path: {f_path} is not a readable Parquet file ({e}) — "
                                       "remove or replace it"]) from None
            if meta.num_rows == 0:
                continue
            names = meta.schema.to_arrow_schema().names
        else:
            with opener(f_path, "rb") as f:
                line = b""
                for line in f:
                    if line.strip():
                        break
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (ValueError, TypeError):
                row = None
            if not isinstance(row, dict):
                raise ConfigError([f"data.path: the first line of {f_path} is not a JSON object — "
                                   "write one JSON object per line (JSONL)"])
            names = list(row)
        missing = [_missing_column(key, column, f_path, names) for key, column in columns if column not in names]
        if missing:
            raise ConfigError(missing)
        return
    raise ConfigError([f"data.path: {path} holds no rows ({len(files)} file(s), all empty) — "
                       "point it at a corpus with text"])


def _missing_column(key: str, column: str, f_path: str, names: list[str]) -> str:
    what = "the text column" if key == "data.text_column" else "a column of the corpus (data.format sets which)"
    return (f"{key}: column {column!r} is not in {f_path} (columns: {', '.join(names[:10])}) — set {key} "
            f"to {what}")


def corpus_fingerprint(fs, files: list[str], data_cfg, tokenizer_hash: str) -> str:
    """Changes when the corpus files, the packing or the tokenizer change."""
    h = hashlib.sha256()
    for f in files:
        info = fs.info(f) if fs is not None else os.stat(f)
        size = info["size"] if isinstance(info, dict) else info.st_size
        h.update(f"{f}:{size}".encode())
    h.update(f"{data_cfg.text_column}:{data_cfg.seq_len}:{data_cfg.max_rows}:{tokenizer_hash}".encode())
    if data_cfg.text_pair_column or data_cfg.label_column:  # (only then: LM fingerprints stay as they were)
        h.update(f"{data_cfg.text_pair_column}:{data_cfg.label_column}".encode())
    if is_examples(data_cfg):  # instruction data: what renders the rows and where the loss goes
        from .instruct import chat_template_text

        d = data_cfg
        h.update(f"{d.format}:{[c for _, c in corpus_columns(d)]}:{d.loss_on}:"
                 f"{chat_template_text(d.chat_template) if d.format == 'chat' else ''}".encode())
    return f"sha256:{h.hexdigest()[:32]}"


# ---------------------------------------------------------------- Ray Data stages (workers)

_TOKENIZERS: dict = {}


def _tokenizer(path: str, trust_remote_code: bool):
    """One tokenizer per worker process: workers are reused across tasks."""
    key = (path, trust_remote_code)
    if key not in _TOKENIZERS:
        from .models import load_tokenizer

        tok = load_tokenizer(path, trust_remote_code=trust_remote_code)
        tok.model_max_length = 1 << 30  # packing, not truncation, bounds lengths
        _TOKENIZERS[key] = tok
    return _TOKENIZERS[key]


def _clean_texts(values) -> tuple[list[str], int]:
    texts, skipped = [], 0
    for v in values:
        if isinstance(v, (bytes, bytearray)):
            try:
                v = bytes(v).decode("utf-8")
            except UnicodeDecodeError:
                skipped += 1
                continue
        if not isinstance(v, str) or not v.strip():
            skipped += 1
            continue
        texts.append(v)
    return texts, skipped


def tokenize_and_pack(batch: dict, *, tokenizer_path: str, trust_remote_code: bool, text_column: str,
                      seq_len: int, eos_id: int) -> dict:
    """One batch of documents → fixed-length sequences. The first row carries the batch's counts."""
    texts, skipped = _clean_texts(batch[text_column])
    ids: list[int] = []
    if texts:
        for doc in _tokenizer(tokenizer_path, trust_remote_code)(texts, add_special_tokens=False)["input_ids"]:
            ids.extend(doc)
            ids.append(eos_id)
    n = len(ids) // seq_len
    seqs = np.asarray(ids[: n * seq_len], dtype=np.int64).reshape(n, seq_len)
    valid = np.ones(len(seqs), dtype=bool)
    if n == 0:  # keep the counts even when the batch yields no full sequence
        seqs = np.zeros((1, seq_len), dtype=np.int64)
        valid = np.zeros(1, dtype=bool)
    docs = np.zeros(len(seqs), dtype=np.int64)
    skip = np.zeros(len(seqs), dtype=np.int64)
    docs[0], skip[0] = len(texts), skipped
    return {"input_ids": seqs, "valid": valid, "docs": docs, "skipped": skip}


# Keys of a map_batches stage's output that are not columns of an input row of their own.
_STAGE_KEYS = ("input_ids", "valid", "docs", "skipped", "labels")


def in_process(fs, files: list[str], fmt: str, data_cfg) -> bool:
    """Small enough to read and pack in the driver (see the module docstring for why)."""
    if fmt == "parquet" and data_cfg.max_rows and data_cfg.max_rows <= IN_PROCESS_MAX_ROWS:
        return True  # Parquet is read batch by batch: only max_rows documents are touched
    total = 0
    for f in files:
        info = fs.info(f) if fs is not None else os.stat(f)
        total += info["size"] if isinstance(info, dict) else info.st_size
    return total <= IN_PROCESS_MAX_BYTES


def _corpus_columns(fs, files: list[str], fmt: str, columns: list[str]):
    """The task's columns of each file in turn, as {column: chunk of Python values} (Parquet: 1,024
    rows at once); columns[0] is the text column."""
    import pyarrow.json as pajson

    opener = fs.open if fs is not None else open
    for path in files:
        with opener(path, "rb") as f:
            if fmt == "parquet":
                for batch in pq.ParquetFile(f).iter_batches(batch_size=1024, columns=columns):
                    yield {c: batch.column(c).to_pylist() for c in columns}
                continue
            table = pajson.read_json(f)
        missing = [c for c in columns if c not in table.column_names]
        if table.num_rows and missing:
            raise ConfigError([f"data.path: column {missing[0]!r} is not in {path} — every file of "
                               "data.path needs the columns the config names (data.text_column, "
                               "data.messages_column, ...)"])
        if table.num_rows:
            yield {c: table.column(c).to_pylist() for c in columns}


def packed_in_process(cfg, fs, files: list[str], fmt: str, tokenizer_path: str, eos_id: int):
    """The same stream as `sequences_dataset`, read and packed in this process: batches of
    DOCS_PER_BATCH consecutive documents (up to data.max_rows) through `tokenize_and_pack`."""
    from .tasks import get_task

    fn, kw, columns = get_task(cfg).map_batches_fn(tokenizer_path, eos_id)
    left = cfg.data.max_rows or float("inf")
    docs: dict[str, list] = {c: [] for c in columns}
    for chunk in _corpus_columns(fs, files, fmt, columns):
        take = int(min(len(chunk[columns[0]]), left))
        for c in columns:
            docs[c].extend(chunk[c][:take])
        left -= take
        while len(docs[columns[0]]) >= DOCS_PER_BATCH:
            yield fn({c: v[:DOCS_PER_BATCH] for c, v in docs.items()}, **kw)
            docs = {c: v[DOCS_PER_BATCH:] for c, v in docs.items()}
        if left <= 0:
            break
    if docs[columns[0]]:
        yield fn(docs, **kw)


def sequences_dataset(cfg, fs, files: list[str], fmt: str, tokenizer_path: str, eos_id: int):
    """The streaming Ray Data pipeline: read → tokenize + pack (order preserved)."""
    import ray.data
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    from .tasks import get_task

    fn, kw, columns = get_task(cfg).map_batches_fn(tokenizer_path, eos_id)
    filesystem = PyFileSystem(FSSpecHandler(fs)) if fs is not None else None
    if fmt == "parquet":
        ds = ray.data.read_parquet(files, filesystem=filesystem).select_columns(columns)
    else:
        ds = ray.data.read_json(files, filesystem=filesystem, lines=True)
    if cfg.data.max_rows:
        ds = ds.limit(cfg.data.max_rows)
    return ds.map_batches(fn, batch_size=DOCS_PER_BATCH, batch_format="numpy", num_cpus=0.5, fn_kwargs=kw)


# ---------------------------------------------------------------- driver: shards of inputs

def is_eval(seq_ids: np.ndarray, fraction: float) -> np.ndarray:
    """Deterministic split by a 64-bit mix of seq_id (independent of batch and shard boundaries)."""
    x = seq_ids.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53) < fraction


def inputs_table(seq_ids: np.ndarray, input_ids: np.ndarray, vocab_size: int,
                 labels: np.ndarray | None = None, extra: dict | None = None,
                 schema: pa.Schema | None = None) -> pa.Table:
    """Input rows: seq_id, input_ids [N, L] (+ labels [N, P] of a task whose rows carry labels, + the
    task's `extra` columns {name: [N, w]}, typed by the task's input `schema`: a list type takes the
    w values of a row, any other type its single value)."""
    from .targets import id_type

    def column(values: np.ndarray, typ) -> pa.ListArray:
        offsets = pa.array(np.arange(0, values.size + 1, max(values.shape[1], 1), dtype=np.int32))
        return pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1), type=typ))

    cols = {"seq_id": pa.array(seq_ids, type=pa.int64()), "input_ids": column(input_ids, id_type(vocab_size))}
    if labels is not None:
        cols["labels"] = column(labels, pa.int64())
    for name, values in (extra or {}).items():
        typ = schema.field(name).type
        cols[name] = column(values, typ.value_type) if pa.types.is_list(typ) else pa.array(values[:, 0], typ)
    return pa.table(cols)


def check_recorded_inputs(cfg, store, info) -> dict | None:
    """The inputs already recorded in `store` (None if none), refused (StoreError) when they were
    built from another corpus or packing than this run's. Reads only: safe before the writer lease."""
    if not store.has_inputs():
        return None
    fs, files, _ = resolve_corpus(cfg.data)
    recorded = store.manifest()["inputs"]["info"]
    if recorded.get("fingerprint") != corpus_fingerprint(fs, files, cfg.data, info.tokenizer["hash"]):
        raise StoreError(
            f"targets.store: {store.uri} was built from another corpus or packing "
            f"({recorded.get('data_path')}, seq_len {recorded.get('seq_len')}) than this run "
            f"({cfg.data.path}, seq_len {cfg.data.seq_len}) — use another targets.store or delete it")
    return recorded


def build_inputs(cfg, store, info) -> dict:
    """Write the train shards and eval file of inputs once; a re-run with the same corpus skips."""
    recorded = check_recorded_inputs(cfg, store, info)
    if recorded is not None:
        return dict(recorded, skipped=True)
    fs, files, fmt = resolve_corpus(cfg.data)
    fingerprint = corpus_fingerprint(fs, files, cfg.data, info.tokenizer["hash"])

    eos = info.eos_token_id if info.eos_token_id is not None else 0
    if in_process(fs, files, fmt, cfg.data):
        batches = packed_in_process(cfg, fs, files, fmt, cfg.teacher.model, eos)
    else:
        batches = sequences_dataset(cfg, fs, files, fmt, cfg.teacher.model, eos).iter_batches(
            batch_size=None, batch_format="numpy")
    shard_rows, vocab = cfg.targets.shard_rows, info.vocab_size
    shards: dict[str, dict] = {}
    pending: list[np.ndarray] = []
    eval_parts: list[np.ndarray] = []
    counts = {"docs": 0, "skipped_rows": 0, "train_rows": 0, "eval_rows": 0}
    next_id = 0

    width = 1 + cfg.data.seq_len  # a row of `rows`: seq_id, input_ids, then the task's labels (if any)
    # ... or the task's extra columns (an example's loss_mask, length), each [n, w], in this order
    extras: list[tuple[str, int]] = []
    from .tasks import get_task

    schema = get_task(cfg).input_schema(vocab)

    def table_of(rows: np.ndarray) -> pa.Table:
        if extras:
            cuts = np.cumsum([width] + [w for _, w in extras])
            extra = {name: rows[:, lo:hi] for (name, _), lo, hi in zip(extras, cuts[:-1], cuts[1:])}
            return inputs_table(rows[:, 0], rows[:, 1:width], vocab, extra=extra, schema=schema)
        return inputs_table(rows[:, 0], rows[:, 1:width], vocab, rows[:, width:] if labelled else None)

    def flush(rows: np.ndarray) -> None:
        sid = f"{len(shards):05d}"
        table = table_of(rows)
        written = store.write_file(f"inputs/train/{sid}.parquet", table)
        # The checksum goes into the manifest: every reader of the inputs verifies it.
        shards[sid] = {"input": written["path"], "rows": table.num_rows, "checksum": written["checksum"],
                       "bytes": written["bytes"]}

    buffered, labelled = 0, False
    for batch in batches:
        counts["docs"] += int(batch["docs"].sum())
        counts["skipped_rows"] += int(batch["skipped"].sum())
        seqs = batch["input_ids"][batch["valid"]]
        if "labels" in batch:  # a task whose input rows carry labels (sequence_classification)
            labelled, seqs = True, np.column_stack([seqs, batch["labels"][batch["valid"]]])
        names = [k for k in batch if k not in _STAGE_KEYS]
        if names:  # e.g. instruction rows: loss_mask [n, L], length [n]
            parts = [np.asarray(batch[k]).reshape(len(batch[k]), -1) for k in names]
            extras = [(k, p.shape[1]) for k, p in zip(names, parts)]
            seqs = np.column_stack([seqs] + [p[batch["valid"]] for p in parts])
        ids = np.arange(next_id, next_id + len(seqs), dtype=np.int64)
        next_id += len(seqs)
        held_out = is_eval(ids, cfg.data.eval_fraction)
        eval_parts.append(np.column_stack([ids[held_out], seqs[held_out]]))
        train = np.column_stack([ids[~held_out], seqs[~held_out]])
        pending.append(train)
        buffered += len(train)
        while buffered >= shard_rows:
            rows = np.concatenate(pending)
            flush(rows[:shard_rows])
            pending, buffered = [rows[shard_rows:]], len(rows) - shard_rows
        counts["train_rows"] += len(train)
    if buffered:
        flush(np.concatenate(pending))
    if counts["train_rows"] == 0:
        raise ConfigError([f"data.path: {cfg.data.path} yields no training sequence of {cfg.data.seq_len} "
                           f"tokens ({counts['docs']} usable rows, {counts['skipped_rows']} skipped as "
                           "empty or not UTF-8) — add text or lower data.seq_len"])
    evals = np.concatenate(eval_parts) if eval_parts else np.zeros((0, cfg.data.seq_len + 1), np.int64)
    counts["eval_rows"] = len(evals)
    eval_written = store.write_file("inputs/eval.parquet", table_of(evals))
    recorded = dict(counts, fingerprint=fingerprint, data_path=cfg.data.path, seq_len=cfg.data.seq_len,
                    shards=len(shards), files=len(files))
    store.record_inputs(shards, eval_written["path"], recorded, eval_checksum=eval_written["checksum"])
    return dict(recorded, skipped=False)
