"""Soft-target formats: teacher logits -> Arrow columns -> `SparseTargets` torch tensors.

Positions. A sequence has L tokens `input_ids[0..L-1]`; targets exist for T = L - 1 positions and
position j describes `input_ids[j+1]`. `encode` therefore reads `teacher_logits[:, :-1]`.

On disk (one row per sequence; every list column is flattened position-major):

    seq_id          int64
    input_ids       list<ID>       length L
    policy_version  int64          -1 for corpus rows
    label_logprob   list<float16>  length T     teacher log p(input_ids[j+1])
    sampled:
      sample_ids    list<ID>       unique drawn ids, position 0's first (ascending within a position)
      sample_counts list<uint8>    their counts; they sum to `samples` at every position
      sample_len    list<uint8>    length T: how many unique ids each position has
    topk:
      topk_ids      list<ID>       length T*k, descending log-prob within a position
      topk_logprobs list<float16>  length T*k, log p at the capture temperature
      tail_logmass  list<float16>  length T, log(1 - sum of top-k p), clamped to >= -65504

ID is uint16 when the vocabulary has <= 65,536 ids, else uint32. Log-probs are float16 and clamped
to [-65504, 0] so that every stored value is finite (a -inf would turn into NaN in the losses).

In memory (`decode`): `SparseTargets` with a support of M ids per position, M = the largest
support in the batch. Padding slots have id 0 and log-prob -inf; consumers mask on
`logprobs > -inf` (or `isfinite`), never on the id.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.nn.functional as F

FORMATS = ("sampled", "topk")
KINDS = ("sampled", "topk", "dense")
FP16_MIN = -65504.0  # most negative finite float16
# Dictionary encoding only where values repeat a lot; never on id / log-prob columns (high
# cardinality: dictionary pages cost space and decode time there) nor on the unique seq_id.
_DICT_OK = {"policy_version", "sample_counts", "sample_len"}


@dataclass
class SparseTargets:
    """One batch of teacher targets as torch tensors (shapes [B, T, ...]; rows may also be [N, ...]).

    ids:           [B, T, M] long, the support; None means dense (logprobs covers the whole vocab).
    logprobs:      [B, T, M] float32 teacher log p on the support at the capture temperature;
                   -inf on padding slots (their id is 0). Dense: [B, T, V].
    tail_logmass:  [B, T] float32 log of the teacher mass outside the support (topk only, else None).
    label_logprob: [B, T] float32 teacher log p of the actual next token (NaN where unknown).
    kind:          "sampled" | "topk" | "dense".
    """

    ids: torch.Tensor | None
    logprobs: torch.Tensor
    tail_logmass: torch.Tensor | None
    label_logprob: torch.Tensor
    kind: str

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"SparseTargets.kind={self.kind!r} is not one of {KINDS}")

    def to(self, device, non_blocking: bool = False) -> "SparseTargets":
        """A copy with every tensor moved to `device`."""
        def mv(t):
            return None if t is None else t.to(device, non_blocking=non_blocking)
        return replace(self, ids=mv(self.ids), logprobs=mv(self.logprobs),
                       tail_logmass=mv(self.tail_logmass), label_logprob=mv(self.label_logprob))

    def select(self, mask: torch.Tensor) -> "SparseTargets":
        """Rows where the boolean `mask` ([B, T]) is true: every tensor becomes [N, ...]."""
        def sel(t):
            return None if t is None else t[mask]
        return replace(self, ids=sel(self.ids), logprobs=self.logprobs[mask],
                       tail_logmass=sel(self.tail_logmass), label_logprob=self.label_logprob[mask])


# ---------------------------------------------------------------------------------------- schema

def id_type(vocab_size: int) -> pa.DataType:
    """Arrow type of token ids: uint16 when every id fits (vocab <= 65,536), else uint32."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    return pa.uint16() if vocab_size <= 65536 else pa.uint32()


def id_dtype(vocab_size: int) -> np.dtype:
    """numpy equivalent of `id_type`."""
    return np.dtype(np.uint16) if id_type(vocab_size) == pa.uint16() else np.dtype(np.uint32)


def _check_fmt(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"targets.format={fmt!r} is not supported — use one of {', '.join(FORMATS)}")


def arrow_schema(fmt: str, vocab_size: int) -> pa.Schema:
    """The columns of every shard file of a store with this format and vocabulary (module docstring)."""
    _check_fmt(fmt)
    idt = id_type(vocab_size)
    fields = [("seq_id", pa.int64()), ("input_ids", pa.list_(idt)), ("policy_version", pa.int64()),
              ("label_logprob", pa.list_(pa.float16()))]
    if fmt == "sampled":
        fields += [("sample_ids", pa.list_(idt)), ("sample_counts", pa.list_(pa.uint8())),
                   ("sample_len", pa.list_(pa.uint8()))]
    else:
        fields += [("topk_ids", pa.list_(idt)), ("topk_logprobs", pa.list_(pa.float16())),
                   ("tail_logmass", pa.list_(pa.float16()))]
    return pa.schema(fields)


def write_options(schema: pa.Schema) -> dict:
    """Keyword arguments for `pq.write_table(table, where, **write_options(table.schema))`.

    zstd; dictionary encoding only on policy_version / sample_counts / sample_len, never on the
    id or log-prob columns. Parquet names a list column's values `<name>.list.element`, and
    `use_dictionary` matches those leaf paths.
    """
    allowed = [f"{f.name}.list.element" if pa.types.is_list(f.type) else f.name
               for f in schema if f.name in _DICT_OK]
    return {"compression": "zstd", "use_dictionary": allowed}


def columns(fmt: str) -> list[str]:
    """The format's columns produced by `encode` (everything except seq_id/input_ids/policy_version)."""
    _check_fmt(fmt)
    return ["label_logprob"] + (["sample_ids", "sample_counts", "sample_len"] if fmt == "sampled"
                                else ["topk_ids", "topk_logprobs", "tail_logmass"])


def build_table(encoded: dict, *, seq_id, input_ids, policy_version, fmt: str, vocab_size: int) -> pa.Table:
    """One shard table from `encode` output plus the row columns, with `arrow_schema(fmt, vocab_size)`.

    seq_id [B] ints; input_ids [B, L] (tensor or array); policy_version an int or [B] ints.
    Builds the list columns from flat values + offsets (no per-element Python conversion).
    """
    schema = arrow_schema(fmt, vocab_size)
    ids = input_ids.cpu().numpy() if isinstance(input_ids, torch.Tensor) else np.asarray(input_ids)
    b = ids.shape[0]
    seq = np.asarray(seq_id, dtype=np.int64).reshape(b)
    pv = np.broadcast_to(np.asarray(policy_version, dtype=np.int64), (b,))
    cols = {"seq_id": pa.array(seq, pa.int64()),
            "input_ids": _list_array(list(ids.astype(id_dtype(vocab_size))), schema.field("input_ids").type),
            "policy_version": pa.array(pv, pa.int64())}
    for name in columns(fmt):
        if name not in encoded:
            raise ValueError(f"build_table: encoded targets have no column {name!r} (format {fmt})")
        cols[name] = _list_array(encoded[name], schema.field(name).type)
    return pa.Table.from_arrays([cols[f.name] for f in schema], schema=schema)


_NP = {pa.uint8(): np.uint8, pa.uint16(): np.uint16, pa.uint32(): np.uint32, pa.int64(): np.int64,
       pa.float16(): np.float16}


def _list_array(arrays, typ: pa.ListType) -> pa.ListArray:
    np_dtype = _NP[typ.value_type]
    lens = np.fromiter((len(a) for a in arrays), dtype=np.int64, count=len(arrays))
    if lens.sum() > np.iinfo(np.int32).max:
        raise ValueError(f"a shard column holds {lens.sum()} values, more than a Parquet list column's "
                         "int32 offsets allow — use smaller shards")
    offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
    np.cumsum(lens, out=offsets[1:])
    flat = np.concatenate([np.asarray(a, dtype=np_dtype) for a in arrays]) if len(arrays) else \
        np.zeros(0, np_dtype)
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(flat, typ.value_type))


def bytes_per_token(total_bytes: int, n_tokens: int) -> float:
    """Store size per target position (0.0 when there are no tokens)."""
    return float(total_bytes) / n_tokens if n_tokens > 0 else 0.0


# ---------------------------------------------------------------------------------------- encode

def encode(teacher_logits: torch.Tensor, input_ids: torch.Tensor, *, fmt: str, k: int | None = None,
           samples: int | None = None, capture_temperature: float = 1.0, vocab_size: int,
           generator: torch.Generator | None = None) -> dict[str, list[np.ndarray]]:
    """Teacher logits of whole sequences -> the format's columns, one numpy array per sequence.

    teacher_logits: [B, L, V] any float dtype (upcast to float32); input_ids: [B, L].
    Log-probs are log_softmax(logits / capture_temperature) at positions 0..L-2 (T = L - 1).
    sampled: `samples` (<= 255) ids drawn with replacement from p per position (torch.multinomial
      with `generator`; when the generator lives on another device the probabilities move to it),
      stored as unique ids + counts. topk: the `k` most likely ids, their log-probs and the log of
      the mass outside them (logsumexp of the other log-probs, exact and stable).
    Returns {column: [array per sequence]} for `columns(fmt)`.
    """
    _check_fmt(fmt)
    if teacher_logits.dim() != 3 or input_ids.shape != teacher_logits.shape[:2]:
        raise ValueError(f"encode: expected teacher_logits [B, L, V] and input_ids [B, L], got "
                         f"{tuple(teacher_logits.shape)} and {tuple(input_ids.shape)}")
    bsz, seq_len, vocab = teacher_logits.shape
    if seq_len < 2:
        raise ValueError(f"encode: sequences need at least 2 tokens (got L={seq_len})")
    if vocab > vocab_size:
        raise ValueError(f"encode: the teacher's logits have {vocab} columns but vocab_size={vocab_size}; "
                         "pass the model's config.vocab_size (the width of its output layer)")
    if not capture_temperature > 0:
        raise ValueError(f"targets.capture_temperature must be > 0, got {capture_temperature}")
    t = max(seq_len - 1, 0)  # 0 rows: the length is unknown
    with torch.no_grad():
        logp = F.log_softmax(teacher_logits[:, :-1].float() / capture_temperature, dim=-1)  # [B, T, V]
        labels = input_ids[:, 1:].to(device=logp.device, dtype=torch.long)
        label_lp = logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        out = {"label_logprob": list(_fp16(label_lp))}
        idt = id_dtype(vocab_size)
        if fmt == "topk":
            if k is None or not 1 <= k <= vocab:
                raise ValueError(f"targets.k must be in 1..{vocab} (the vocabulary), got {k}")
            vals, idx = logp.topk(k, dim=-1)                                  # [B, T, k], descending
            rest = logp.scatter(-1, idx, float("-inf"))
            tail = torch.logsumexp(rest, dim=-1)                              # log(1 - sum top-k p)
            out["topk_ids"] = list(idx.reshape(bsz, t * k).cpu().numpy().astype(idt))
            out["topk_logprobs"] = list(_fp16(vals.reshape(bsz, t * k)))
            out["tail_logmass"] = list(_fp16(tail))
        else:
            if samples is None or not 1 <= samples <= 255:
                raise ValueError(f"targets.samples must be in 1..255 (counts are uint8), got {samples}")
            ids, counts, lens = _draw_unique(logp.reshape(bsz * t, vocab).exp(), samples, generator)
            per_seq = lens.reshape(bsz, t).sum(1)
            cuts = np.cumsum(per_seq)[:-1]
            out["sample_ids"] = np.split(ids.astype(idt), cuts)
            out["sample_counts"] = np.split(counts.astype(np.uint8), cuts)
            out["sample_len"] = list(lens.astype(np.uint8).reshape(bsz, t))
    return out


def _fp16(x: torch.Tensor) -> np.ndarray:
    """float32 log-probs -> finite float16 numpy (clamped to [-65504, 0]; NaN stays NaN)."""
    return x.clamp(FP16_MIN, 0.0).to(torch.float16).cpu().numpy()


def _draw_unique(probs: torch.Tensor, samples: int, generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw `samples` ids per row of probs [N, V]; unique ids (ascending) + counts, rows concatenated.

    Vectorised: sort each row of draws, mark where a new id starts, and the counts are the gaps
    between consecutive starts in the flattened (row-major) order.
    """
    if generator is not None and generator.device != probs.device:
        probs = probs.to(generator.device)
    draws = torch.multinomial(probs, samples, replacement=True, generator=generator)  # [N, S]
    srt = draws.sort(dim=1).values
    new = torch.ones_like(srt, dtype=torch.bool)
    new[:, 1:] = srt[:, 1:] != srt[:, :-1]
    ids = srt[new]
    starts = new.reshape(-1).nonzero().squeeze(1)
    counts = torch.diff(starts, append=starts.new_tensor([srt.numel()]))
    lens = new.sum(1)
    return ids.cpu().numpy(), counts.cpu().numpy(), lens.cpu().numpy()


# ---------------------------------------------------------------------------------------- decode

# Columns of token ids / counts: integers >= 0; the rest (log-probs) any real numbers.
_INT_COLUMNS = {"input_ids", "topk_ids", "sample_ids", "sample_counts", "sample_len"}


def _flat(batch, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(flat values, per-row lengths) of list column `name` of a Table / RecordBatch / dict batch.

    Anything that is not a list of numbers per row (a flat column, strings, nested lists, nulls,
    negative ids) raises a ValueError naming the column: a damaged shard must fail clearly.
    """
    if isinstance(batch, (pa.Table, pa.RecordBatch)):
        if name not in batch.schema.names:
            raise ValueError(f"decode: the batch has no column {name!r} (has {batch.schema.names})")
        col = batch.column(name)
    else:
        if name not in batch:
            raise ValueError(f"decode: the batch has no column {name!r} (has {sorted(batch)})")
        col = batch[name]
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    if isinstance(col, pa.Array):
        if not (pa.types.is_list(col.type) or pa.types.is_large_list(col.type)
                or pa.types.is_fixed_size_list(col.type)):
            raise ValueError(f"decode: column {name!r} has type {col.type}, expected a list per row")
        if col.null_count:
            raise ValueError(f"decode: column {name!r} has {col.null_count} null rows")
        values = col.flatten()
        if values.null_count:
            raise ValueError(f"decode: column {name!r} holds {values.null_count} null values")
        lens = pc.list_value_length(col).to_numpy(zero_copy_only=False).astype(np.int64)
        return _numeric(values.to_numpy(zero_copy_only=False), name), lens
    if isinstance(col, np.ndarray) and col.dtype != object:
        if col.ndim != 2:
            raise ValueError(f"decode: column {name!r} must be 2-D or hold one array per row, "
                             f"got shape {col.shape}")
        return _numeric(col.reshape(-1), name), np.full(col.shape[0], col.shape[1], dtype=np.int64)
    rows = [np.asarray(r) for r in col]   # object array (Ray Data numpy batches) or list of arrays
    if any(r.ndim != 1 for r in rows):
        raise ValueError(f"decode: every row of column {name!r} must be a 1-D array")
    lens = np.fromiter((r.size for r in rows), dtype=np.int64, count=len(rows))
    flat = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    return _numeric(flat, name), lens


def _numeric(flat: np.ndarray, name: str) -> np.ndarray:
    if flat.size == 0:
        return flat.astype(np.int64) if flat.dtype.kind not in "iuf" else flat
    ints = name in _INT_COLUMNS
    if flat.dtype.kind not in ("iu" if ints else "iuf"):
        raise ValueError(f"decode: column {name!r} holds {flat.dtype} values, expected "
                         f"{'integers' if ints else 'numbers'}")
    if ints and flat.dtype.kind == "i" and flat.min() < 0:
        raise ValueError(f"decode: column {name!r} holds a negative value ({flat.min()})")
    return flat


def _fixed(batch, name: str, per_row: int | None = None) -> np.ndarray:
    """A list column whose rows all have the same length, as [B, n]."""
    flat, lens = _flat(batch, name)
    n = int(lens[0]) if lens.size else (per_row or 0)
    if (lens != n).any() or (per_row is not None and n != per_row):
        want = per_row if per_row is not None else n
        raise ValueError(f"decode: every row of {name!r} must hold {want} values, got lengths "
                         f"{sorted(set(lens.tolist()))[:5]}")
    return flat.reshape(lens.size, n)


def decode(batch, fmt: str) -> tuple[torch.Tensor, SparseTargets]:
    """Rows of a shard -> (input_ids LongTensor [B, L], SparseTargets with [B, T, M] tensors).

    batch: pa.Table, pa.RecordBatch, or a dict of numpy arrays (list columns as object arrays of
    arrays, as Ray Data's "numpy" batch format gives them, or 2-D arrays). Vectorised over the
    flattened list values. sampled: M = the largest number of unique ids at any position of the
    batch; logprobs = log(count / sum of counts at that position); padding id 0 / log-prob -inf;
    tail_logmass None. topk: M = k, the stored log-probs and tail.
    """
    _check_fmt(fmt)
    inp = _fixed(batch, "input_ids")
    bsz, seq_len = inp.shape
    if bsz and seq_len < 2:
        raise ValueError(f"decode: input_ids rows hold {seq_len} token(s); a shard row needs at least 2")
    t = max(seq_len - 1, 0)  # 0 rows: the length is unknown
    input_ids = torch.from_numpy(inp.astype(np.int64))
    label = torch.from_numpy(_fixed(batch, "label_logprob", t).astype(np.float32))
    if fmt == "topk":
        flat_ids, lens = _flat(batch, "topk_ids")
        k = int(lens[0]) // t if lens.size and t else 0
        if (lens != t * k).any() or k == 0 and bsz:
            raise ValueError(f"decode: topk_ids rows must hold T*k = {t}*k values, got {lens[:5].tolist()}")
        ids = torch.from_numpy(flat_ids.astype(np.int64).reshape(bsz, t, k))
        lp = torch.from_numpy(_fixed(batch, "topk_logprobs", t * k).astype(np.float32).reshape(bsz, t, k))
        tail = torch.from_numpy(_fixed(batch, "tail_logmass", t).astype(np.float32))
        return input_ids, SparseTargets(ids, lp, tail, label, "topk")

    slen = _fixed(batch, "sample_len", t).astype(np.int64).reshape(-1)       # [B*T]
    flat_ids, id_lens = _flat(batch, "sample_ids")
    counts, c_lens = _flat(batch, "sample_counts")
    per_seq = slen.reshape(bsz, t).sum(1)
    if (id_lens != per_seq).any() or (c_lens != per_seq).any():
        raise ValueError("decode: sample_ids / sample_counts lengths do not match sum(sample_len) per row "
                         "(corrupt shard?)")
    if (slen == 0).any():
        raise ValueError("decode: a position has sample_len 0 (corrupt shard?)")
    if (counts == 0).any():
        raise ValueError("decode: sample_counts holds a count of 0 (corrupt shard?)")
    n_pos = bsz * t
    m = int(slen.max()) if slen.size else 0
    row = np.repeat(np.arange(n_pos), slen)
    col = np.arange(row.size) - np.repeat(np.cumsum(slen) - slen, slen)
    counts = counts.astype(np.float64)
    total = np.bincount(row, weights=counts, minlength=n_pos)
    ids = np.zeros((n_pos, m), dtype=np.int64)
    lp = np.full((n_pos, m), -np.inf, dtype=np.float32)
    ids[row, col] = flat_ids
    lp[row, col] = np.log(counts / total[row])
    return input_ids, SparseTargets(torch.from_numpy(ids.reshape(bsz, t, m)),
                                    torch.from_numpy(lp.reshape(bsz, t, m)), None, label, "sampled")


# ---------------------------------------------------------------------------------------- dense

def from_logits(teacher_logits: torch.Tensor, labels: torch.Tensor | None = None, *,
                ignore_index: int = -100) -> SparseTargets:
    """Dense targets from teacher logits [B, T, V] (already aligned: row j describes token j+1).

    logprobs = float32 log_softmax (detached); label_logprob = log p(labels) where labels [B, T] are
    given and not ignore_index, NaN elsewhere (unknown).
    """
    with torch.no_grad():
        lp = F.log_softmax(teacher_logits.detach().float(), dim=-1)
        label = torch.full(lp.shape[:-1], float("nan"), device=lp.device)
        if labels is not None:
            keep = labels != ignore_index
            got = lp.gather(-1, labels.clamp(min=0).long().unsqueeze(-1)).squeeze(-1)
            label = torch.where(keep, got, label)
    return SparseTargets(None, lp, None, label, "dense")


# ---------------------------------------------------------------------------------------- fidelity

def fidelity(teacher_logits: torch.Tensor, student_logits: torch.Tensor, targets: SparseTargets,
             labels: torch.Tensor, *, temperature: float = 1.0, ignore_index: int = -100) -> dict:
    """How well cached `targets` stand in for the dense teacher, on tokens where labels != ignore_index.

    teacher_logits, student_logits: [N, T, V] (aligned with targets and labels [N, T]). The teacher's
    dense distribution p = softmax(teacher_logits / temperature); the cached one is what the loss
    sees (`losses.teacher_buckets`: re-tempered support, plus the tail bucket for topk).

    Returns floats:
      captured_mass_mean / _p5 / _p1: sum of dense p (at temperature 1) over the stored support,
        mean and 5th / 1st percentile over tokens (1.0 for dense targets);
      ce_dense: mean over tokens of H(p, q) = -sum_v p_v log q_v, q = softmax(student / temperature);
      ce_cached: mean of the cached estimate -sum_support w_i log q_i (+ p_tail * -log q_tail for topk);
      ce_bias = ce_cached - ce_dense; ce_bias_rel = ce_bias / ce_dense;
      ce_err_std: standard deviation over tokens of (cached - dense) per-token cross-entropy;
      grad_angle_deg: mean over tokens of the angle between the gradients of the forward-KL loss
        w.r.t. that token's student logits with dense vs cached targets;
      grad_angle_batch_deg: the angle between the whole mini-batch gradients (all tokens' logit
        gradients of the mean loss, as one vector);
      grad_norm_ratio: |cached gradient| / |dense gradient| of the whole mini-batch;
      tokens: number of tokens measured.
    """
    from raydistill import losses  # late import: losses imports this module

    mask = labels != ignore_index
    n = int(mask.sum())
    if n == 0:
        raise ValueError("fidelity: every label is ignore_index; nothing to measure")
    t_logits = teacher_logits.detach().float()[mask]                 # [n, V]
    s_logits = student_logits.detach().float()[mask]
    cached = targets.to(t_logits.device).select(mask.to(t_logits.device))
    dense = from_logits(t_logits)

    p1 = F.softmax(t_logits, dim=-1)
    if cached.ids is None:
        mass = torch.ones(n)
    else:
        on = torch.isfinite(cached.logprobs)
        mass = (p1.gather(-1, cached.ids) * on).sum(-1)

    with torch.enable_grad():
        s_d = s_logits.clone().requires_grad_(True)
        s_c = s_logits.clone().requires_grad_(True)
        ce_d = losses.cross_entropy_per_token(s_d, dense, temperature=temperature)
        ce_c = losses.cross_entropy_per_token(s_c, cached, temperature=temperature)
        # forward KL = cross-entropy - teacher entropy; the entropy has no student gradient.
        g_d, = torch.autograd.grad(ce_d.mean(), s_d)
        g_c, = torch.autograd.grad(ce_c.mean(), s_c)
    ce_d, ce_c = ce_d.detach(), ce_c.detach()
    eps = 1e-30
    cos_tok = (g_d * g_c).sum(-1) / (g_d.norm(dim=-1) * g_c.norm(dim=-1)).clamp_min(eps)
    cos_all = (g_d * g_c).sum() / (g_d.norm() * g_c.norm()).clamp_min(eps)
    deg = lambda c: torch.rad2deg(torch.arccos(c.clamp(-1.0, 1.0)))  # noqa: E731
    ce_dense, ce_cached = float(ce_d.mean()), float(ce_c.mean())
    bias = ce_cached - ce_dense
    return {
        "tokens": n,
        "captured_mass_mean": float(mass.mean()),
        "captured_mass_p5": float(torch.quantile(mass.double(), 0.05)),
        "captured_mass_p1": float(torch.quantile(mass.double(), 0.01)),
        "ce_dense": ce_dense,
        "ce_cached": ce_cached,
        "ce_bias": bias,
        "ce_bias_rel": bias / ce_dense if ce_dense != 0 else math.nan,
        "ce_err_std": float((ce_c - ce_d).std()) if n > 1 else 0.0,
        "grad_angle_deg": float(deg(cos_tok).mean()),
        "grad_angle_batch_deg": float(deg(cos_all)),
        "grad_norm_ratio": float(g_c.norm() / g_d.norm().clamp_min(eps)),
    }
