"""Soft-target formats: teacher logits -> Arrow columns -> `SparseTargets` torch tensors.

Positions. A sequence has L tokens `input_ids[0..L-1]`; targets exist for T = L - 1 positions and
position j describes `input_ids[j+1]`. `encode` therefore reads `teacher_logits[:, :-1]`.

On disk (one row per sequence; every list column is flattened position-major):

    seq_id               int64
    input_ids            list<ID>       length L
    policy_version       int64          -1 for corpus rows
    capture_temperature  float32        Tc: the targets describe p_Tc = softmax(logits / Tc)
    label_logprob        list<float16>  length T     teacher log p_Tc(input_ids[j+1])
    sampled:
      sample_ids    list<ID>       unique ids drawn from p_Tc, position 0's first (ascending within a position)
      sample_counts list<uint8>    their counts; they sum to `samples` at every position
      sample_len    list<uint8>    length T: how many unique ids each position has
      entropy       list<float16>  length T: H(p_Tc), the dense teacher's entropy (unbiased KL = CE - H)
    topk:
      topk_ids      list<ID>       length T*k, descending log-prob within a position
      topk_logprobs list<float16>  length T*k, log p_Tc
      tail_logmass  list<float16>  length T, log(1 - sum of top-k p), clamped to >= -65504
      tail_pow      list<float16>  length T*2G: per position f(b) = log sum_tail p_v^b at the G
                                   exponents b of TAIL_BETAS, then f'(b) (= the mean log p_v under
                                   the tail tempered by b): what re-tempering the tail needs
    dense (few classes: a classifier's P = 1 position per example, not the LM layout above):
      label_logprob list<float16>  length P     teacher log p_Tc(label), NaN where the row has no label
      dense_logprobs list<float16> length P*C   log p_Tc over all C classes, position-major
      labels        list<int64>    length P     the hard label of each position, -100 where none

Stores of examples (data.format chat / prompt_response, `raydistill.instruct`) carry two more
columns, last, and hold soft targets only at *loss positions*:

    loss_mask            list<uint8>    length L: 1 where token j carries loss (an input column)
    length               int32          real (non-pad) tokens of the row (an input column)

Target position j (which predicts input_ids[j+1]) is a loss position when loss_mask[j+1] == 1.
Every per-position list column above (label_logprob, sample_len, entropy, topk_*, tail_*) then
holds one entry (or k, or 2G) per loss position of the row, in position order, instead of one per
position: nothing is computed or stored for prompt tokens and padding. In memory (`decode`) the
targets are placed back at their positions, [B, T, M] as always; a position with no target holds a
point mass on id 0 (log-prob 0 in slot 0, -inf elsewhere; tail FP16_MIN; label_logprob NaN;
entropy 0): finite, and never used, because its label is -100 (`Task.labels`). A store without
loss_mask (packed text) has every position a loss position: the layout above, unchanged.

ID is uint16 when the vocabulary has <= 65,536 ids, else uint32. Log-probs are float16 and clamped
to [-65504, 0] so that every stored value is finite (a -inf would turn into NaN in the losses).
SCHEMA_VERSION numbers this layout; it is part of a store's target params, so a store written
with another layout is refused (or re-scored), never decoded wrongly.

Re-tempering the tail. At training temperature T the teacher is p_T ∝ p_Tc^b with b = Tc / T. The
top-k weights are exact; the tail's tempered mass is sum_tail p_v^b, which the one atom
`tail_logmass` does not determine. f(b) is convex in b (a log-sum-exp of linear functions), so a
cubic Hermite interpolation of f from its values and slopes on the TAIL_BETAS grid (log-spaced,
b = 2 .. 0.1, i.e. T/Tc = 0.5 .. 10) is accurate: measured tail-mass error <= 2.4e-4 absolute on
Zipf and Gaussian teachers at V = 32,000, k = 20, float16 rounding included (README). Outside the
grid the losses refuse.

In memory (`decode`): `SparseTargets` with a support of M ids per position, M = the largest
support in the batch. Padding slots have id 0 and log-prob -inf; consumers mask on
`logprobs > -inf` (or `isfinite`), never on the id.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.nn.functional as F

from raydistill.config import TARGET_FORMATS as FORMATS
from raydistill.config import TOPK_TEMPERATURE_RANGE

# The formats this module encodes and decodes: all of them (dense: `encode_dense`, few classes).
ENCODED = FORMATS
KINDS = ("sampled", "topk", "dense")
FP16_MIN = -65504.0  # most negative finite float16
SCHEMA_VERSION = 2   # 2: capture_temperature, entropy (sampled) and tail_pow (topk) columns
# Exponents b = Tc / T at which the tail's tempered log-mass and its slope are stored (module doc).
TAIL_BETAS = (2.0, 1.4, 1.0, 0.7, 0.5, 0.35, 0.25, 0.1)
assert (1 / max(TAIL_BETAS), 1 / min(TAIL_BETAS)) == TOPK_TEMPERATURE_RANGE  # what config checks


@dataclass
class SparseTargets:
    """One batch of teacher targets as torch tensors (shapes [B, T, ...]; rows may also be [N, ...]).

    ids:           [B, T, M] long, the support; None means dense (logprobs covers the whole vocab).
    logprobs:      [B, T, M] float32 teacher log p on the support at the capture temperature;
                   -inf on padding slots (their id is 0). Dense: [B, T, V].
    tail_logmass:  [B, T] float32 log of the teacher mass outside the support (topk only, else None).
    label_logprob: [B, T] float32 teacher log p of the actual next token (NaN where unknown).
    kind:          "sampled" | "topk" | "dense".
    tail_pow:      [B, T, 2G] float32 tail log-mass f(b) and slope f'(b) at TAIL_BETAS (topk; None
                   when unknown: the tail can then only be used at the capture temperature).
    entropy:       [B, T] float32 entropy of the dense teacher at the capture temperature (sampled;
                   None when unknown).
    capture_temperature: Tc, the temperature the stored distribution is at.
    """

    ids: torch.Tensor | None
    logprobs: torch.Tensor
    tail_logmass: torch.Tensor | None
    label_logprob: torch.Tensor
    kind: str
    tail_pow: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    capture_temperature: float = 1.0

    _TENSORS = ("ids", "logprobs", "tail_logmass", "label_logprob", "tail_pow", "entropy")

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"SparseTargets.kind={self.kind!r} is not one of {KINDS}")

    def _map(self, fn) -> "SparseTargets":
        return replace(self, **{n: None if (t := getattr(self, n)) is None else fn(t) for n in self._TENSORS})

    def to(self, device, non_blocking: bool = False) -> "SparseTargets":
        """A copy with every tensor moved to `device`."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def select(self, mask: torch.Tensor) -> "SparseTargets":
        """Rows where the boolean `mask` ([B, T]) is true: every tensor becomes [N, ...]."""
        return self._map(lambda t: t[mask])


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
    if fmt not in ENCODED:
        raise ValueError(f"targets.format={fmt!r} has no shard encoding here — use one of {', '.join(ENCODED)}")


# The input columns a store of examples adds to each shard row, last (module docstring).
EXAMPLE_COLUMNS = (("loss_mask", pa.list_(pa.uint8())), ("length", pa.int32()))


def arrow_schema(fmt: str, vocab_size: int, masked: bool = False) -> pa.Schema:
    """The columns of every shard file of a store with this format and vocabulary (module docstring);
    `masked`: a store of examples (loss_mask + length, targets at loss positions only)."""
    _check_fmt(fmt)
    idt, f16 = id_type(vocab_size), pa.list_(pa.float16())
    fields = [("seq_id", pa.int64()), ("input_ids", pa.list_(idt)), ("policy_version", pa.int64()),
              ("capture_temperature", pa.float32()), ("label_logprob", f16)]
    if fmt == "sampled":
        fields += [("sample_ids", pa.list_(idt)), ("sample_counts", pa.list_(pa.uint8())),
                   ("sample_len", pa.list_(pa.uint8())), ("entropy", f16)]
    elif fmt == "dense":
        fields += [("dense_logprobs", f16), ("labels", pa.list_(pa.int64()))]
    else:
        fields += [("topk_ids", pa.list_(idt)), ("topk_logprobs", f16), ("tail_logmass", f16), ("tail_pow", f16)]
    return pa.schema(fields + (list(EXAMPLE_COLUMNS) if masked else []))


def columns(fmt: str, masked: bool = False) -> list[str]:
    """The format's columns produced by `encode` (everything except seq_id/input_ids/policy_version;
    `masked`: plus loss_mask and length, which the caller adds to encode's output)."""
    return arrow_schema(fmt, 2, masked).names[3:]


def build_table(encoded: dict, *, seq_id, input_ids, policy_version, fmt: str, vocab_size: int) -> pa.Table:
    """One shard table from `encode` output plus the row columns, with `arrow_schema(fmt, vocab_size)`.

    seq_id [B] ints; input_ids [B, L] (tensor or array); policy_version an int or [B] ints.
    Builds the list columns from flat values + offsets (no per-element Python conversion).
    A token id outside [0, vocab_size) is refused: a cast to uint16 would silently wrap it.
    `encoded` holding "loss_mask" and "length" (one per row) makes a store-of-examples table.
    """
    masked = "loss_mask" in encoded
    schema = arrow_schema(fmt, vocab_size, masked)
    ids = input_ids.cpu().numpy() if isinstance(input_ids, torch.Tensor) else np.asarray(input_ids)
    b = ids.shape[0]
    _check_ids(ids, "input_ids", vocab_size)
    seq = np.asarray(seq_id, dtype=np.int64).reshape(b)
    pv = np.broadcast_to(np.asarray(policy_version, dtype=np.int64), (b,))
    cols = {"seq_id": pa.array(seq, pa.int64()),
            "input_ids": _list_array(list(ids.astype(id_dtype(vocab_size))), schema.field("input_ids").type),
            "policy_version": pa.array(pv, pa.int64())}
    for name in columns(fmt, masked):
        if name not in encoded:
            raise ValueError(f"build_table: encoded targets have no column {name!r} (format {fmt}) — "
                             "build it from targets.encode's output")
        typ = schema.field(name).type
        if not pa.types.is_list(typ):  # one value per row
            dtype = np.int32 if pa.types.is_integer(typ) else np.float32
            cols[name] = pa.array(np.asarray(encoded[name], dtype=dtype).reshape(b), typ)
            continue
        if name.endswith("_ids"):
            for a in encoded[name]:
                _check_ids(np.asarray(a), name, vocab_size)
        cols[name] = _list_array(encoded[name], typ)
    return pa.Table.from_arrays([cols[f.name] for f in schema], schema=schema)


def _check_ids(ids: np.ndarray, name: str, vocab_size: int) -> None:
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        bad = int(ids.min()) if ids.min() < 0 else int(ids.max())
        raise ValueError(f"build_table: {name} holds token id {bad}, outside the vocabulary [0, {vocab_size}) — "
                         "the tokenizer and the teacher's vocab_size disagree: check teacher.model")


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


# ---------------------------------------------------------------------------------------- encode

def encode(teacher_logits: torch.Tensor, input_ids: torch.Tensor, *, fmt: str, k: int | None = None,
           samples: int | None = None, capture_temperature: float = 1.0, vocab_size: int,
           generator: torch.Generator | None = None,
           loss_mask: torch.Tensor | None = None) -> dict[str, list[np.ndarray]]:
    """Teacher logits of whole sequences -> the format's columns, one numpy array per sequence.

    teacher_logits: [B, L, V] any float dtype (upcast to float32); input_ids: [B, L].
    Log-probs are log_softmax(logits / capture_temperature) at positions 0..L-2 (T = L - 1).
    loss_mask [B, L] (a store of examples): only the loss positions j (loss_mask[:, j + 1] != 0)
      are computed and stored, in position order (module docstring); None: every position.
    sampled: `samples` (<= 255) ids drawn with replacement from p per position (torch.multinomial
      with `generator`; when the generator lives on another device the probabilities move to it),
      stored as unique ids + counts, and the entropy H(p) per position. topk: the `k` most likely
      ids, their log-probs, the log of the mass outside them (logsumexp of the other log-probs,
      exact and stable) and the tail's tempered log-mass and slope at TAIL_BETAS.
    Returns {column: [array (or one value) per sequence]} for `columns(fmt)`.
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
        # One row per stored position, row-major: every position, or a store of examples' loss positions.
        logits = teacher_logits[:, :-1]
        labels = input_ids[:, 1:].to(device=logits.device, dtype=torch.long)
        if loss_mask is None:
            logits, labels, per_row = logits.reshape(bsz * t, vocab), labels.reshape(-1), np.full(bsz, t)
        else:
            pos = loss_mask[:, 1:].to(device=logits.device) != 0
            logits, labels, per_row = logits[pos], labels[pos], pos.sum(1).cpu().numpy()
        logp = F.log_softmax(logits.float() / capture_temperature, dim=-1)  # [N, V]
        label_lp = logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        split = _row_splitter(per_row)
        out = {"capture_temperature": [float(capture_temperature)] * bsz, "label_logprob": split(_fp16(label_lp))}
        idt = id_dtype(vocab_size)
        if fmt == "topk":
            if k is None or not 1 <= k <= vocab:
                raise ValueError(f"targets.k must be in 1..{vocab} (the vocabulary), got {k}")
            vals, idx = logp.topk(k, dim=-1)                                  # [N, k], descending
            rest = logp.scatter(-1, idx, float("-inf"))
            tail = torch.logsumexp(rest, dim=-1)                              # log(1 - sum top-k p)
            out["topk_ids"] = split(idx.cpu().numpy().astype(idt))
            out["topk_logprobs"] = split(_fp16(vals))
            out["tail_logmass"] = split(_fp16(tail))
            out["tail_pow"] = split(_fp16(_tail_pow(rest), hi=-FP16_MIN))
        else:
            if samples is None or not 1 <= samples <= 255:
                raise ValueError(f"targets.samples must be in 1..255 (counts are uint8), got {samples}")
            ids, counts, lens = _draw_unique(logp.exp(), samples, generator)
            per_seq = np.bincount(np.repeat(np.arange(bsz), per_row), weights=lens, minlength=bsz).astype(np.int64)
            cuts = np.cumsum(per_seq)[:-1]
            out["sample_ids"] = np.split(ids.astype(idt), cuts)
            out["sample_counts"] = np.split(counts.astype(np.uint8), cuts)
            out["sample_len"] = split(lens.astype(np.uint8))
            out["entropy"] = split(_fp16(torch.special.entr(logp.exp()).sum(-1), lo=0.0, hi=-FP16_MIN))
    return out


def _row_splitter(per_row: np.ndarray):
    """values [N, ...] (N = the stored positions of all rows, row-major) -> one flat array per row."""
    cuts = np.cumsum(per_row)[:-1]
    return lambda values: [a.reshape(-1) for a in np.split(values, cuts)]


def _tail_pow(rest: torch.Tensor) -> torch.Tensor:
    """[..., V] tail log-probs (-inf on the support) -> [..., 2G]: f(b) = logsumexp(b * rest), then
    f'(b) = sum softmax(b * rest) * rest, for b in TAIL_BETAS (0 slope for an empty tail)."""
    finite = torch.where(torch.isfinite(rest), rest, torch.zeros_like(rest))
    vals, slopes = [], []
    for b in TAIL_BETAS:
        f = torch.logsumexp(b * rest, dim=-1)
        w = torch.softmax(b * rest, dim=-1).nan_to_num(0.0)       # all -inf (k = V): NaN -> 0
        vals.append(f)
        slopes.append((w * finite).sum(-1))
    return torch.cat([torch.stack(vals, -1), torch.stack(slopes, -1)], dim=-1)


def _fp16(x: torch.Tensor, lo: float = FP16_MIN, hi: float = 0.0) -> np.ndarray:
    """float32 values (log-probs by default: [-65504, 0]) -> finite float16 numpy; NaN stays NaN."""
    return x.clamp(lo, hi).to(torch.float16).cpu().numpy()


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


def _names(batch) -> list[str]:
    """The batch's column names; a name that is not UTF-8 (a damaged file) fails as decode does."""
    if not isinstance(batch, (pa.Table, pa.RecordBatch)):
        return list(batch)
    try:
        return batch.schema.names
    except UnicodeDecodeError as e:
        raise ValueError(f"decode: a column name is not valid UTF-8 ({e}) — the shard is damaged") from None


def _flat(batch, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(flat values, per-row lengths) of list column `name` of a Table / RecordBatch / dict batch.

    Anything that is not a list of numbers per row (a flat column, strings, nested lists, nulls,
    negative ids) raises a ValueError naming the column: a damaged shard must fail clearly.
    """
    if isinstance(batch, (pa.Table, pa.RecordBatch)):
        if name not in _names(batch):
            raise ValueError(f"decode: the batch has no column {name!r} (has {_names(batch)})")
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
    tail_logmass None; entropy the stored H(p). topk: M = k, the stored log-probs, tail and tail_pow.
    Every row of a batch must share one capture temperature (one store has one). A batch with a
    loss_mask column (a store of examples) holds targets at its loss positions only: `_decode_masked`.
    """
    _check_fmt(fmt)
    if fmt == "dense":
        return _decode_dense(batch)
    if "loss_mask" in _names(batch):
        return _decode_masked(batch, fmt)
    inp = _fixed(batch, "input_ids")
    bsz, seq_len = inp.shape
    if bsz and seq_len < 2:
        raise ValueError(f"decode: input_ids rows hold {seq_len} token(s); a shard row needs at least 2")
    t = max(seq_len - 1, 0)  # 0 rows: the length is unknown
    input_ids = torch.from_numpy(inp.astype(np.int64))
    label = torch.from_numpy(_fixed(batch, "label_logprob", t).astype(np.float32))
    tc = _one_temperature(batch, bsz)
    if fmt == "topk":
        flat_ids, lens = _flat(batch, "topk_ids")
        k = int(lens[0]) // t if lens.size and t else 0
        if (lens != t * k).any() or k == 0 and bsz:
            raise ValueError(f"decode: topk_ids rows must hold T*k = {t}*k values, got {lens[:5].tolist()}")
        ids = torch.from_numpy(flat_ids.astype(np.int64).reshape(bsz, t, k))
        lp = torch.from_numpy(_fixed(batch, "topk_logprobs", t * k).astype(np.float32).reshape(bsz, t, k))
        tail = torch.from_numpy(_fixed(batch, "tail_logmass", t).astype(np.float32))
        g2 = 2 * len(TAIL_BETAS)
        tail_pow = torch.from_numpy(_fixed(batch, "tail_pow", t * g2).astype(np.float32).reshape(bsz, t, g2))
        return input_ids, SparseTargets(ids, lp, tail, label, "topk", tail_pow=tail_pow, capture_temperature=tc)

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
    entropy = torch.from_numpy(_fixed(batch, "entropy", t).astype(np.float32))
    return input_ids, SparseTargets(torch.from_numpy(ids.reshape(bsz, t, m)),
                                    torch.from_numpy(lp.reshape(bsz, t, m)), None, label, "sampled",
                                    entropy=entropy, capture_temperature=tc)


# Per-position columns of a store of examples and how many values each loss position has (None:
# sample_len of the position; "k": the top-k width).
_PER_POSITION = {"label_logprob": 1, "sample_len": 1, "entropy": 1, "sample_ids": None, "sample_counts": None,
                 "topk_ids": "k", "topk_logprobs": "k", "tail_logmass": 1, "tail_pow": 2 * len(TAIL_BETAS)}


def _decode_masked(batch, fmt: str) -> tuple[torch.Tensor, SparseTargets]:
    """A store of examples' rows -> (input_ids [B, L], SparseTargets [B, T, M] with the targets at the
    loss positions and the module docstring's point mass elsewhere).

    Each loss position becomes one row of a 2-token pseudo-batch (its token and the next) that the
    plain `decode` checks and decodes ([N, 1, M]); the result is then placed at the positions."""
    inp = _fixed(batch, "input_ids")
    bsz, seq_len = inp.shape
    pos = _fixed(batch, "loss_mask", seq_len)[:, 1:] != 0                    # [B, T]
    rows, cols = np.nonzero(pos)                                             # row-major
    per_row = pos.sum(1)
    tc = _one_temperature(batch, bsz)
    names = [c for c in columns(fmt) if c in _PER_POSITION]
    pseudo = {"input_ids": np.stack([inp[rows, cols], inp[rows, cols + 1]], 1).reshape(len(rows), 2),
              "capture_temperature": np.full(len(rows), tc)}
    widths = {1: np.ones(len(rows), np.int64), 2 * len(TAIL_BETAS): np.full(len(rows), 2 * len(TAIL_BETAS))}
    if fmt == "sampled":
        widths[None] = _fixed_per_row(batch, "sample_len", per_row).astype(np.int64)
    else:
        total = int(_flat(batch, "topk_ids")[1].sum())
        k = total // max(len(rows), 1)
        widths["k"] = np.full(len(rows), k)
    for name in names:
        flat, lens = _flat(batch, name)
        w = widths[_PER_POSITION[name]]
        want = np.bincount(np.repeat(np.arange(bsz), per_row), weights=w, minlength=bsz).astype(np.int64)
        if (lens != want).any():
            raise ValueError(f"decode: {name!r} rows must hold one entry per loss position of loss_mask "
                             f"(lengths {want[:5].tolist()}), got {lens[:5].tolist()} (corrupt shard?)")
        offsets = np.zeros(len(rows) + 1, np.int32)
        np.cumsum(w, out=offsets[1:])
        pseudo[name] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat))
    _, t = decode(pseudo, fmt)
    return torch.from_numpy(inp.astype(np.int64)), _place(t, torch.from_numpy(pos), tc)


def _fixed_per_row(batch, name: str, per_row: np.ndarray) -> np.ndarray:
    """The flat values of a per-position column with one value per loss position (rows checked)."""
    flat, lens = _flat(batch, name)
    if (lens != per_row).any():
        raise ValueError(f"decode: {name!r} rows must hold one value per loss position of loss_mask "
                         f"({per_row[:5].tolist()}), got {lens[:5].tolist()} (corrupt shard?)")
    return flat


def _place(t: SparseTargets, pos: torch.Tensor, tc: float) -> SparseTargets:
    """Targets of the loss positions ([N, 1, ...]) placed at `pos` ([B, T]) in [B, T, ...] tensors."""
    m = max(t.logprobs.shape[-1], 1)

    def put(values, fill, width=None):
        if values is None:
            return None
        values = values[:, 0]
        shape = tuple(pos.shape) + ((width,) if width is not None else tuple(values.shape[1:]))
        out = torch.full(shape, fill, dtype=values.dtype)
        if width is not None and values.shape[-1] < width:  # an all-empty batch: M = 0 -> 1 slot
            values = F.pad(values, (0, width - values.shape[-1]), value=fill)
        out[pos] = values
        return out

    logprobs = put(t.logprobs, float("-inf"), m)
    logprobs[..., 0] = torch.where(pos, logprobs[..., 0], torch.zeros(()))  # point mass where no target
    return replace(t, ids=put(t.ids, 0, m), logprobs=logprobs, tail_logmass=put(t.tail_logmass, FP16_MIN),
                   label_logprob=put(t.label_logprob, float("nan")), tail_pow=put(t.tail_pow, 0.0),
                   entropy=put(t.entropy, 0.0), capture_temperature=tc)


def _one_temperature(batch, rows: int) -> float:
    """The batch's capture temperature: one positive finite value shared by every row."""
    name = "capture_temperature"
    names = _names(batch)
    if name not in names:
        raise ValueError(f"decode: the batch has no column {name!r} (has {names}) — a shard written by an "
                         f"older raydistill (schema < {SCHEMA_VERSION}): re-run the teacher pass")
    col = batch.column(name) if isinstance(batch, (pa.Table, pa.RecordBatch)) else batch[name]
    try:
        if isinstance(col, (pa.Array, pa.ChunkedArray)):
            if col.null_count or not pa.types.is_floating(col.type):
                raise TypeError
            col = col.to_numpy(zero_copy_only=False)
        vals = np.asarray(col, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise ValueError(f"decode: column {name!r} must hold one float per row") from None
    if vals.size != rows or (rows and not (np.isfinite(vals).all() and (vals > 0).all()
                                           and (vals == vals[0]).all())):
        raise ValueError(f"decode: column {name!r} must hold one positive temperature shared by the "
                         f"{rows} rows, got {np.unique(vals)[:5].tolist()}")
    return float(vals[0]) if rows else 1.0


# ---------------------------------------------------------------------------------------- dense

def encode_dense(logits: torch.Tensor, labels: torch.Tensor, *, capture_temperature: float = 1.0,
                 ignore_index: int = -100) -> dict[str, list]:
    """The `dense` columns of aligned logits [B, P, C] (a classifier: P = 1) and labels [B, P]:
    float16 log_softmax(logits / capture_temperature) over every class, the label's log-prob
    (NaN where labels == ignore_index) and the labels themselves."""
    if not capture_temperature > 0:
        raise ValueError(f"targets.capture_temperature must be > 0, got {capture_temperature}")
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"encode_dense: expected logits [B, P, C] and labels [B, P], got "
                         f"{tuple(logits.shape)} and {tuple(labels.shape)}")
    bsz = logits.shape[0]
    with torch.no_grad():
        lp = from_logits(logits.float() / capture_temperature, labels, ignore_index=ignore_index)
    return {"capture_temperature": [float(capture_temperature)] * bsz,
            "label_logprob": list(_fp16(lp.label_logprob)), "dense_logprobs": list(_fp16(lp.logprobs.reshape(bsz, -1))),
            "labels": list(labels.long().cpu().numpy())}


def _decode_dense(batch) -> tuple[torch.Tensor, SparseTargets]:
    """`dense` rows -> (input_ids [B, L], SparseTargets with logprobs [B, P, C]); P from label_logprob."""
    inp = torch.from_numpy(_fixed(batch, "input_ids").astype(np.int64))
    label = _fixed(batch, "label_logprob")
    bsz, p = label.shape
    flat, lens = _flat(batch, "dense_logprobs")
    c = int(lens[0]) // p if lens.size and p else 0
    if c == 0 and bsz or (lens != p * c).any():
        raise ValueError(f"decode: dense_logprobs rows must hold P*C = {p}*C values, got {lens[:5].tolist()}")
    lp = torch.from_numpy(flat.astype(np.float32).reshape(bsz, p, c))
    return inp, SparseTargets(None, lp, None, torch.from_numpy(label.astype(np.float32)), "dense",
                              capture_temperature=_one_temperature(batch, bsz))


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
