"""Property tests: shards decoded from arbitrary bytes or arbitrary (wrong) columns fail only with
clear errors — a CorruptShardError / StoreError naming the shard, or a ValueError starting with
"decode:" naming the column — never with a crash, a foreign exception type or a hang.

Three sources of bad input:
  * a shard file whose bytes are replaced by arbitrary data, with the manifest's checksum left as
    it was (the checksum catches it) or updated to match (the Parquet reader or decode must);
  * a valid shard file with a few bytes changed or cut off, checksum updated (reaches deeper
    into the Parquet reader than pure noise does);
  * `targets.decode` on tables whose list columns have arbitrary lengths, value types and nulls.
"""
from __future__ import annotations

import hashlib
import os
import tempfile

import numpy as np
import pyarrow as pa
import pytest
import torch
from hypothesis import HealthCheck, assume, example, given, settings, strategies as st
from hypothesis.control import current_build_context, event

from raydistill.errors import CorruptShardError, RaydistillError, StoreError
from raydistill.store import SoftTargetStore
from raydistill import targets as tg

TOK = {"name": "fuzz", "vocab_size": 64, "hash": "sha256:fuzz"}
FORMATS = {"topk": {"format": "topk", "k": 3, "capture_temperature": 1.0},
           "sampled": {"format": "sampled", "samples": 20, "capture_temperature": 1.0}}
FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                       HealthCheck.function_scoped_fixture])


def _event(what: str) -> None:
    """Label the outcome for --hypothesis-show-statistics (no-op outside a @given test)."""
    try:
        current_build_context()
    except Exception:
        return
    event(what)


def valid_table(fmt: str, rows: int = 3, seq_len: int = 6, seed: int = 0) -> pa.Table:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, seq_len, 64, generator=g)
    ids = torch.randint(0, 64, (rows, seq_len), generator=g)
    enc = tg.encode(logits, ids, fmt=fmt, k=3, samples=20, vocab_size=64, generator=g)
    return tg.build_table(enc, seq_id=np.arange(rows), input_ids=ids, policy_version=-1, fmt=fmt,
                          vocab_size=64)


def _commit(store: SoftTargetStore, sid: str, fmt: str, table: pa.Table) -> None:
    w = store.write_shard(sid, 1, table)
    store.commit(sid, 1, {**w, "teacher_rev": "r", "format": fmt,
                          "params": {k: v for k, v in FORMATS[fmt].items() if k != "format"},
                          "produced_at_step": -1, "policy_version": -1})


# One store per format for the whole module: hypothesis examples rewrite its shard file in place.
_STORES: dict[str, tuple[SoftTargetStore, bytes, dict]] = {}
_TMP = tempfile.TemporaryDirectory(prefix="rd-fuzz-")


def fuzz_store(fmt: str):
    if fmt not in _STORES:
        store = SoftTargetStore.open(os.path.join(_TMP.name, fmt), tokenizer=TOK, targets=FORMATS[fmt])
        _commit(store, "s0", fmt, valid_table(fmt))
        rec = store.current("s0")
        with open(store.full_path(rec["path"]), "rb") as f:
            _STORES[fmt] = (store, f.read(), rec)
    return _STORES[fmt]


def replace_shard(store: SoftTargetStore, rec: dict, data: bytes, *, match_checksum: bool) -> None:
    """Put `data` where the current version of s0 lives; optionally record its checksum/size."""
    with open(store.full_path(rec["path"]), "wb") as f:
        f.write(data)
    m = store.manifest()
    v = m["shards"]["s0"]["versions"][str(rec["version"])]
    if match_checksum:
        v.update(checksum="sha256:" + hashlib.sha256(data).hexdigest(), bytes=len(data))
    else:
        v.update(checksum=rec["checksum"], bytes=rec["bytes"])
    store._write_manifest(m)


def read_and_decode(store: SoftTargetStore, fmt: str, original: bytes, data: bytes, match: bool) -> None:
    """read_shard + decode: either they succeed or they raise a clear error (asserted here)."""
    try:
        table = store.read_shard("s0")
    except CorruptShardError as e:
        msg = str(e)
        assert "s0" in msg and "v1" in msg and "expected" in msg and e.shard_id == "s0"
        # The checksum is what catches any change unless the manifest was updated to match.
        assert match or data != original or "checksum" not in msg
        _event(f"store refused: {msg.split(': ', 1)[1].split(' (')[0]}")
        return
    # Only bytes whose checksum matches the record are ever parsed; they may still be a valid file.
    assert match or data == original
    assert table.num_rows == 3   # the row count was checked against the record
    decode_clearly(table, fmt)


def decode_clearly(batch, fmt: str):
    try:
        ids, t = tg.decode(batch, fmt)
    except RaydistillError as e:
        assert str(e)
        _event("decode refused (RaydistillError)")
        return None
    except ValueError as e:
        assert str(e).startswith("decode:"), repr(e)
        _event("decode refused")
        return None
    _event("decoded")
    # Whatever decodes is shaped as documented; ids are valid indices; sampled weights are finite.
    b, length = ids.shape
    t_len = max(length - 1, 0)   # a batch of 0 rows has no known length
    assert t.logprobs.shape[:2] == (b, t_len) and t.label_logprob.shape == (b, t_len)
    assert t.ids is not None and t.ids.shape == t.logprobs.shape and t.ids.dtype == torch.long
    assert (t.ids >= 0).all() and (ids >= 0).all()
    if t.kind == "sampled":   # log(count / total): NaN only if a count were 0 (refused)
        assert not torch.isnan(t.logprobs).any()
    return ids, t


# ---------------------------------------------------------------- arbitrary bytes on disk

@FUZZ
@given(fmt=st.sampled_from(sorted(FORMATS)), data=st.binary(max_size=2048), match=st.booleans())
def test_read_shard_of_arbitrary_bytes(fmt, data, match):
    store, original, rec = fuzz_store(fmt)
    replace_shard(store, rec, data, match_checksum=match)
    read_and_decode(store, fmt, original, data, match)
    assert store.verify("s0") is not None or data == original
    assert set(store.verify_all()) <= {"s0"}


@FUZZ
@given(fmt=st.sampled_from(sorted(FORMATS)), match=st.booleans(),
       edits=st.lists(st.tuples(st.integers(0, 1 << 30), st.integers(0, 255)), max_size=8),
       cut=st.one_of(st.none(), st.integers(0, 1 << 30)))
@example(fmt="topk", match=True, edits=[(13231, 128)], cut=None)   # a column name made invalid UTF-8 (CI find)
def test_read_shard_of_mutated_parquet(fmt, match, edits, cut):
    store, original, rec = fuzz_store(fmt)
    data = bytearray(original)
    for pos, value in edits:
        data[pos % len(data)] = value
    if cut is not None:
        data = data[: cut % (len(data) + 1)]
    replace_shard(store, rec, bytes(data), match_checksum=match)
    read_and_decode(store, fmt, original, bytes(data), match)


def test_fuzz_store_restores_cleanly():
    """Sanity of the harness: the original bytes and record read back and decode."""
    for fmt in FORMATS:
        store, original, rec = fuzz_store(fmt)
        replace_shard(store, rec, original, match_checksum=False)
        assert store.verify_all() == {}
        assert decode_clearly(store.read_shard("s0"), fmt) is not None


# ---------------------------------------------------------------- arbitrary columns in memory

VALUE_TYPES = [pa.uint8(), pa.uint16(), pa.uint32(), pa.int64(), pa.int8(), pa.float16(),
               pa.float32(), pa.float64(), pa.string(), pa.bool_(), pa.list_(pa.int32())]


def _values(draw, typ: pa.DataType, n: int):
    if pa.types.is_string(typ):
        return draw(st.lists(st.text(max_size=3), min_size=n, max_size=n))
    if pa.types.is_boolean(typ):
        return draw(st.lists(st.booleans(), min_size=n, max_size=n))
    if pa.types.is_list(typ):
        return draw(st.lists(st.lists(st.integers(-3, 3), max_size=2), min_size=n, max_size=n))
    if pa.types.is_floating(typ):
        return draw(st.lists(st.one_of(st.floats(-1e4, 0), st.sampled_from([float("nan"), float("-inf"),
                                                                             float("inf")])),
                             min_size=n, max_size=n))
    lo, hi = (0, 255) if typ == pa.uint8() else (-128, 127) if typ == pa.int8() else (0, 70)
    return draw(st.lists(st.integers(lo, hi), min_size=n, max_size=n))


@st.composite
def column(draw, rows: int, typical_len: int):
    """A column of `rows` rows: usually a list column of mostly `typical_len` values, sometimes not."""
    typ = draw(st.sampled_from(VALUE_TYPES))
    if draw(st.integers(0, 9)) == 0:   # not a list column at all
        return pa.array(_values(draw, typ, rows), type=typ)
    lens = [typical_len if draw(st.integers(0, 3)) else draw(st.integers(0, typical_len + 3))
            for _ in range(rows)]
    rows_values = [_values(draw, typ, n) for n in lens]
    if rows and draw(st.integers(0, 9)) == 0:
        rows_values[draw(st.integers(0, rows - 1))] = None          # a null row
    elif rows and lens[0] and draw(st.integers(0, 9)) == 0:
        rows_values[0][0] = None                                     # a null value inside a row
    return pa.array(rows_values, type=pa.list_(typ))


@st.composite
def shard_like_table(draw, fmt: str):
    rows = draw(st.integers(0, 4))
    seq_len = draw(st.integers(1, 5))
    t = seq_len - 1
    k = draw(st.integers(1, 3))
    per = {"input_ids": seq_len, "label_logprob": t, "topk_ids": t * k, "topk_logprobs": t * k,
           "tail_logmass": t, "sample_len": t, "sample_ids": t * 2, "sample_counts": t * 2}
    names = ["input_ids", "label_logprob"] + (["topk_ids", "topk_logprobs", "tail_logmass"] if fmt == "topk"
                                              else ["sample_ids", "sample_counts", "sample_len"])
    cols = {}
    for name in names:
        if draw(st.integers(0, 19)) == 0:
            continue                                                 # a missing column
        cols[name] = draw(column(rows, per[name]))
    return pa.table(cols) if cols else pa.table({"seq_id": pa.array([], pa.int64())})


@FUZZ
@given(data=st.data(), fmt=st.sampled_from(sorted(FORMATS)))
def test_decode_of_arbitrary_columns(data, fmt):
    table = data.draw(shard_like_table(fmt))
    decode_clearly(table, fmt)
    decode_clearly(table.to_batches()[0] if table.num_rows else table, fmt)


@FUZZ
@given(fmt=st.sampled_from(sorted(FORMATS)), rows=st.integers(1, 3),
       column_name=st.sampled_from(["input_ids", "label_logprob", "topk_ids", "topk_logprobs",
                                    "tail_logmass", "sample_ids", "sample_counts", "sample_len"]),
       row=st.integers(0, 2), delta=st.integers(-3, 3), value=st.integers(0, 300))
def test_decode_of_one_wrong_row(fmt, rows, column_name, row, delta, value):
    """A valid shard with one row of one column made longer/shorter or given an odd value."""
    table = valid_table(fmt, rows=rows, seed=rows)
    assume(column_name in table.column_names)
    values = table.column(column_name).to_pylist()
    r = values[row % rows]
    if delta > 0:
        r = r + [r[-1]] * delta
    elif delta < 0:
        r = r[:delta]
    elif r:
        r = [value if isinstance(x, int) else -float(value) for x in r[:1]] + r[1:]
    values[row % rows] = r
    typ = table.schema.field(column_name).type
    try:
        arr = pa.array(values, type=typ)
    except (pa.ArrowInvalid, OverflowError):
        arr = pa.array(values, type=pa.list_(pa.int64()))        # 300 does not fit a uint8 count
    table = table.set_column(table.schema.get_field_index(column_name), column_name, arr)
    out = decode_clearly(table, fmt)
    if out is not None and column_name == "sample_counts" and delta == 0 and value == 0:
        pytest.fail("a zero sample count decoded without an error")


def test_decode_errors_name_the_column():
    table = valid_table("topk")
    bad = table.set_column(table.schema.get_field_index("tail_logmass"), "tail_logmass",
                           pa.array([[0.0]] * 3, pa.list_(pa.float16())))
    with pytest.raises(ValueError, match="decode:.*tail_logmass"):
        tg.decode(bad, "topk")
    with pytest.raises(ValueError, match="decode:.*sample_len"):
        tg.decode(table, "sampled")
    strings = table.set_column(table.schema.get_field_index("label_logprob"), "label_logprob",
                               pa.array([["x"] * 5] * 3, pa.list_(pa.string())))
    with pytest.raises(ValueError, match="decode:.*label_logprob"):
        tg.decode(strings, "topk")
    flat = table.set_column(table.schema.get_field_index("input_ids"), "input_ids", pa.array([1, 2, 3]))
    with pytest.raises(ValueError, match="decode:.*input_ids"):
        tg.decode(flat, "topk")
    with pytest.raises(StoreError):
        SoftTargetStore(os.path.join(_TMP.name, "nowhere")).manifest()
