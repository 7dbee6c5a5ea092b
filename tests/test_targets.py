"""Soft-target formats: encode -> Parquet -> decode round trips, sampling statistics, fidelity."""
from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from raydistill import targets as tg
from raydistill.fidelity import fidelity
from raydistill.store import SoftTargetStore


def _logits(b, seq_len, vocab, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, seq_len, vocab, generator=g) * scale, torch.randint(0, vocab, (b, seq_len), generator=g)


def _table(enc, input_ids, fmt, vocab):
    b = input_ids.shape[0]
    cols = {"seq_id": np.arange(b, dtype=np.int64), "input_ids": list(input_ids.numpy()),
            "policy_version": np.full(b, -1, dtype=np.int64), **enc}
    return pa.Table.from_pydict(cols, schema=tg.arrow_schema(fmt, vocab))


def _parquet_roundtrip(table, tmp_path):
    path = tmp_path / "shard.parquet"
    SoftTargetStore(str(tmp_path)).write_file("shard.parquet", table)   # the store's write path
    meta = pq.ParquetFile(path).metadata
    # zstd everywhere; no dictionary pages on id / log-prob columns
    for i in range(meta.num_columns):
        col = meta.row_group(0).column(i)
        assert col.compression == "ZSTD"
        if col.path_in_schema.split(".")[0] in ("seq_id", "input_ids", "label_logprob", "sample_ids",
                                                "topk_ids", "topk_logprobs", "tail_logmass"):
            assert "RLE_DICTIONARY" not in col.encodings and "PLAIN_DICTIONARY" not in col.encodings
    return pq.read_table(path), meta


def test_id_type_by_vocab_size():
    assert tg.id_type(65536) == pa.uint16() and tg.id_dtype(65536) == np.uint16
    assert tg.id_type(65537) == pa.uint32() and tg.id_dtype(65537) == np.uint32
    s = tg.arrow_schema("topk", 70000)
    assert s.names == ["seq_id", "input_ids", "policy_version", "capture_temperature", "label_logprob",
                       "topk_ids", "topk_logprobs", "tail_logmass", "tail_pow"]
    assert s.field("input_ids").type == pa.list_(pa.uint32())
    assert s.field("capture_temperature").type == pa.float32()
    assert s.field("tail_pow").type == pa.list_(pa.float16())
    s = tg.arrow_schema("sampled", 2048)
    assert s.names[5:] == ["sample_ids", "sample_counts", "sample_len", "entropy"]
    assert s.field("entropy").type == pa.list_(pa.float16())
    assert s.field("sample_ids").type == pa.list_(pa.uint16())
    assert s.field("sample_counts").type == pa.list_(pa.uint8())
    assert s.field("label_logprob").type == pa.list_(pa.float16())
    with pytest.raises(ValueError, match="targets.format"):
        tg.arrow_schema("bogus", 10)
    # dense (issue 13: a classifier's every class) has a shard layout of its own
    assert tg.arrow_schema("dense", 10).names[5:] == ["dense_logprobs", "labels"]


def test_topk_parquet_roundtrip_values(tmp_path):
    b, seq_len, vocab, k = 3, 12, 40, 6
    logits, input_ids = _logits(b, seq_len, vocab)
    enc = tg.encode(logits, input_ids, fmt="topk", k=k, capture_temperature=1.0, vocab_size=vocab)
    assert [a.shape for a in enc["topk_ids"]] == [((seq_len - 1) * k,)] * b
    assert enc["topk_logprobs"][0].dtype == np.float16 and enc["topk_ids"][0].dtype == np.uint16
    table, _ = _parquet_roundtrip(_table(enc, input_ids, "topk", vocab), tmp_path)
    ids_out, t = tg.decode(table, "topk")
    assert torch.equal(ids_out, input_ids)
    lp = F.log_softmax(logits[:, :-1].double(), -1)
    ref_vals, ref_ids = lp.topk(k, -1)
    assert t.kind == "topk" and t.ids.dtype == torch.long and t.logprobs.dtype == torch.float32
    assert torch.equal(t.ids, ref_ids)
    torch.testing.assert_close(t.logprobs.double(), ref_vals, atol=2e-3, rtol=1e-3)   # float16
    ref_tail = torch.log1p(-ref_vals.exp().sum(-1))
    torch.testing.assert_close(t.tail_logmass.double(), ref_tail, atol=2e-3, rtol=1e-3)
    ref_label = lp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(t.label_logprob.double(), ref_label, atol=5e-3, rtol=1e-3)


def test_topk_full_vocab_tail_is_finite_and_tiny():
    logits, input_ids = _logits(2, 5, 10)
    enc = tg.encode(logits, input_ids, fmt="topk", k=10, vocab_size=10)
    _, t = tg.decode(_table(enc, input_ids, "topk", 10), "topk")
    assert torch.isfinite(t.tail_logmass).all()
    assert (t.tail_logmass == tg.FP16_MIN).all()


def test_tail_is_accurate_when_top_k_holds_almost_everything():
    # one dominant logit: 1 - sum(top-k p) suffers cancellation, the logsumexp of the rest does not
    logits = torch.full((1, 3, 8), -20.0)
    logits[..., 0] = 10.0
    enc = tg.encode(logits, torch.zeros(1, 3, dtype=torch.long), fmt="topk", k=1, vocab_size=8)
    expect = F.log_softmax(logits[0, :-1].double(), -1)[:, 1:].logsumexp(-1)   # about -30 + log 7
    np.testing.assert_allclose(enc["tail_logmass"][0].astype(np.float64), expect.numpy(), rtol=1e-3)


def test_low_precision_logits_are_upcast():
    logits, input_ids = _logits(2, 6, 30)
    bf = logits.to(torch.bfloat16)
    a = tg.encode(bf, input_ids, fmt="topk", k=4, vocab_size=30)
    b = tg.encode(bf.float(), input_ids, fmt="topk", k=4, vocab_size=30)
    for name in tg.columns("topk"):
        for x, y in zip(a[name], b[name]):
            np.testing.assert_array_equal(x, y)


def test_sampled_counts_and_unique_ids():
    b, seq_len, vocab, samples = 2, 30, 25, 50
    logits, input_ids = _logits(b, seq_len, vocab, seed=1)
    g = torch.Generator().manual_seed(0)
    enc = tg.encode(logits, input_ids, fmt="sampled", samples=samples, vocab_size=vocab, generator=g)
    for ids, counts, lens in zip(enc["sample_ids"], enc["sample_counts"], enc["sample_len"]):
        assert ids.dtype == np.uint16 and counts.dtype == np.uint8 and lens.dtype == np.uint8
        assert lens.shape == (seq_len - 1,) and ids.size == counts.size == int(lens.sum())
        starts = np.concatenate([[0], np.cumsum(lens.astype(np.int64))])
        for j in range(seq_len - 1):
            seg, cnt = ids[starts[j]:starts[j + 1]], counts[starts[j]:starts[j + 1]]
            assert int(cnt.sum()) == samples
            assert (np.diff(seg.astype(np.int64)) > 0).all()          # unique and ascending
            assert (cnt > 0).all() and int(seg.max()) < vocab
    _, t = tg.decode(_table(enc, input_ids, "sampled", vocab), "sampled")
    assert t.tail_logmass is None and t.kind == "sampled"
    m = int(max(int(x.max()) for x in enc["sample_len"]))
    assert t.ids.shape == (b, seq_len - 1, m)
    support = torch.isfinite(t.logprobs)
    assert torch.equal(support.sum(-1), torch.from_numpy(np.stack(enc["sample_len"]).astype(np.int64)))
    assert (t.ids[~support] == 0).all()                                # padding convention
    torch.testing.assert_close(t.logprobs.exp().sum(-1), torch.ones(b, seq_len - 1))
    # counts come back as log(count / samples)
    first = torch.from_numpy(enc["sample_counts"][0][: int(enc["sample_len"][0][0])].astype(np.float64))
    torch.testing.assert_close(t.logprobs[0, 0, : first.numel()].double(), torch.log(first / samples))


def test_sampled_is_an_unbiased_estimate_of_the_teacher():
    vocab, samples, b, seq_len = 16, 255, 4, 201
    g = torch.Generator().manual_seed(3)
    row = torch.randn(vocab, generator=g) * 1.5
    logits = row.expand(b, seq_len, vocab).clone()                     # every position shares p
    input_ids = torch.zeros(b, seq_len, dtype=torch.long)
    enc = tg.encode(logits, input_ids, fmt="sampled", samples=samples, vocab_size=vocab,
                    generator=torch.Generator().manual_seed(4))
    ids = np.concatenate(enc["sample_ids"]).astype(np.int64)
    counts = np.concatenate(enc["sample_counts"]).astype(np.float64)
    n = b * (seq_len - 1) * samples
    p_hat = np.bincount(ids, weights=counts, minlength=vocab) / n
    p = F.softmax(row.double(), -1).numpy()
    # each draw is an independent categorical: |p_hat - p| within 4 standard errors for every id
    assert (np.abs(p_hat - p) < 4 * np.sqrt(p * (1 - p) / n) + 1e-12).all(), (p_hat, p)


def test_large_vocab_uses_uint32_ids(tmp_path):
    vocab = 70000
    logits = torch.full((1, 3, vocab), -30.0)
    logits[..., 69990:] = 5.0                                         # mass on ids > 65535
    input_ids = torch.tensor([[1, 69999, 69995]])
    for fmt in ("topk", "sampled"):
        enc = tg.encode(logits, input_ids, fmt=fmt, k=4, samples=20, vocab_size=vocab,
                        generator=torch.Generator().manual_seed(0))
        table, _ = _parquet_roundtrip(_table(enc, input_ids, fmt, vocab), tmp_path)
        assert table.schema.field("input_ids").type == pa.list_(pa.uint32())
        ids, t = tg.decode(table, fmt)
        assert torch.equal(ids, input_ids)
        real = t.ids[torch.isfinite(t.logprobs)]
        assert (real >= 69990).all() and (real < vocab).all()


@pytest.mark.parametrize("fmt", ["topk", "sampled"])
def test_decode_accepts_tables_batches_and_numpy_dicts(fmt):
    logits, input_ids = _logits(4, 9, 30, seed=2)
    enc = tg.encode(logits, input_ids, fmt=fmt, k=5, samples=30, vocab_size=30,
                    generator=torch.Generator().manual_seed(1))
    table = _table(enc, input_ids, fmt, 30)
    ref_ids, ref = tg.decode(table, fmt)

    def same(got, rows=slice(None)):
        ids, t = got
        assert torch.equal(ids, ref_ids[rows])
        m = t.ids.shape[-1]
        assert torch.equal(t.ids, ref.ids[rows][..., :m]) and torch.equal(t.logprobs, ref.logprobs[rows][..., :m])
        assert torch.equal(t.label_logprob, ref.label_logprob[rows])
        if fmt == "topk":
            assert torch.equal(t.tail_logmass, ref.tail_logmass[rows])

    # Ray Data "numpy" batches: list columns are object arrays of per-row arrays
    ray_like = {c: table.column(c).to_numpy() for c in table.column_names}
    assert ray_like["input_ids"].dtype == object
    same(tg.decode(ray_like, fmt))
    # fixed-length columns as 2-D arrays, the rest as object arrays
    two_d = dict(ray_like, input_ids=np.stack(ray_like["input_ids"]),
                 label_logprob=np.stack(ray_like["label_logprob"]))
    same(tg.decode(two_d, fmt))
    same(tg.decode(table.to_batches()[0], fmt))
    # multi-chunk and sliced (non-zero offset) columns
    same(tg.decode(pa.concat_tables([table.slice(0, 1), table.slice(1)]), fmt))
    sub_ids, sub = tg.decode(table.slice(2, 2), fmt)
    m = sub.ids.shape[-1]
    assert torch.equal(sub_ids, ref_ids[2:]) and torch.equal(sub.logprobs, ref.logprobs[2:, :, :m])
    assert torch.isinf(ref.logprobs[2:, :, m:]).all()


@pytest.mark.parametrize("fmt", ["topk", "sampled"])
def test_build_table_equals_from_pydict(fmt):
    logits, input_ids = _logits(3, 7, 20)
    enc = tg.encode(logits, input_ids, fmt=fmt, k=3, samples=10, vocab_size=20,
                    generator=torch.Generator().manual_seed(0))
    built = tg.build_table(enc, seq_id=[0, 1, 2], input_ids=input_ids, policy_version=-1, fmt=fmt, vocab_size=20)
    assert built.equals(_table(enc, input_ids, fmt, 20))


def test_encode_rejects_bad_parameters():
    logits, input_ids = _logits(1, 4, 10)
    with pytest.raises(ValueError, match="targets.k"):
        tg.encode(logits, input_ids, fmt="topk", k=11, vocab_size=10)
    with pytest.raises(ValueError, match="targets.samples"):
        tg.encode(logits, input_ids, fmt="sampled", samples=256, vocab_size=10)
    with pytest.raises(ValueError, match="vocab_size"):
        tg.encode(logits, input_ids, fmt="topk", k=2, vocab_size=8)
    with pytest.raises(ValueError, match="targets.format"):
        tg.encode(logits, input_ids, fmt="full", k=2, vocab_size=10)


def test_capture_temperature_softens():
    logits, input_ids = _logits(1, 5, 12)
    enc = tg.encode(logits, input_ids, fmt="topk", k=12, capture_temperature=2.0, vocab_size=12)
    ref = F.log_softmax(logits[0, :-1] / 2.0, -1).topk(12, -1).values.reshape(-1)
    np.testing.assert_allclose(enc["topk_logprobs"][0].astype(np.float32), ref.numpy(), atol=5e-3, rtol=1e-3)


def test_from_logits_dense():
    logits, input_ids = _logits(2, 6, 9)
    labels = input_ids[:, 1:].clone()
    labels[0, 0] = -100
    t = tg.from_logits(logits[:, :-1], labels)
    assert t.kind == "dense" and t.ids is None and t.tail_logmass is None
    lp = F.log_softmax(logits[:, :-1], -1)
    torch.testing.assert_close(t.logprobs, lp)
    assert math.isnan(float(t.label_logprob[0, 0]))
    torch.testing.assert_close(t.label_logprob[1], lp[1].gather(-1, labels[1, :, None]).squeeze(-1))
    assert torch.isnan(tg.from_logits(logits[:, :-1]).label_logprob).all()


def _fidelity_setup(seed=0, vocab=50):
    teacher, input_ids = _logits(4, 33, vocab, seed=seed, scale=2.5)
    student, _ = _logits(4, 33, vocab, seed=seed + 100, scale=1.0)
    labels = input_ids[:, 1:].clone()
    labels[0, :5] = -100
    return teacher, student, input_ids, labels


def test_fidelity_full_topk_is_exact():
    teacher, student, input_ids, labels = _fidelity_setup()
    vocab = teacher.shape[-1]
    enc = tg.encode(teacher, input_ids, fmt="topk", k=vocab, vocab_size=vocab)
    _, t = tg.decode(_table(enc, input_ids, "topk", vocab), "topk")
    f = fidelity(teacher[:, :-1], student[:, :-1], t, labels)
    assert f["tokens"] == int((labels != -100).sum())
    assert abs(f["captured_mass_mean"] - 1) < 1e-5 and abs(f["captured_mass_p1"] - 1) < 1e-5
    assert abs(f["ce_bias"]) < 2e-3 and abs(f["ce_bias_rel"]) < 1e-3    # float16 storage only
    assert f["grad_angle_deg"] < 1.0 and f["grad_angle_batch_deg"] < 1.0
    assert abs(f["grad_norm_ratio"] - 1) < 5e-3
    d = fidelity(teacher[:, :-1], student[:, :-1], tg.from_logits(teacher[:, :-1]), labels)
    assert d["captured_mass_mean"] == 1.0 and abs(d["ce_bias"]) < 1e-6 and d["grad_angle_deg"] < 0.1


def test_fidelity_sampled_beats_small_topk():
    teacher, student, input_ids, labels = _fidelity_setup(seed=5)
    vocab = teacher.shape[-1]
    g = torch.Generator().manual_seed(0)
    out = {}
    for fmt in ("sampled", "topk"):
        enc = tg.encode(teacher, input_ids, fmt=fmt, k=2, samples=200, vocab_size=vocab, generator=g)
        _, t = tg.decode(_table(enc, input_ids, fmt, vocab), fmt)
        out[fmt] = fidelity(teacher[:, :-1], student[:, :-1], t, labels)
    s, k = out["sampled"], out["topk"]
    assert s["captured_mass_mean"] > k["captured_mass_mean"]
    assert abs(s["ce_bias_rel"]) < 0.02                                  # unbiased up to sampling noise
    assert abs(k["ce_bias"]) > 5 * abs(s["ce_bias"])
    assert k["ce_bias"] < 0                              # lumping the tail into one bucket lowers the CE
    assert s["grad_angle_deg"] < k["grad_angle_deg"]
    for key in ("captured_mass_p5", "captured_mass_p1", "ce_err_std", "grad_angle_batch_deg"):
        assert math.isfinite(s[key]) and math.isfinite(k[key])


def test_sparse_targets_to_and_select():
    logits, input_ids = _logits(2, 5, 10)
    enc = tg.encode(logits, input_ids, fmt="topk", k=3, vocab_size=10)
    _, t = tg.decode(_table(enc, input_ids, "topk", 10), "topk")
    moved = t.to("cpu")
    assert torch.equal(moved.ids, t.ids) and moved.kind == "topk"
    mask = torch.tensor([[True, False, True, False], [False, False, False, True]])
    sel = t.select(mask)
    assert sel.ids.shape == (3, 3) and sel.tail_logmass.shape == (3,)


def test_build_table_refuses_ids_outside_the_vocabulary():
    """An id >= vocab_size (or < 0) is refused, naming the column and the fix — a uint16 cast
    would otherwise wrap 65,536 to 0 silently (issue 12, item 8)."""
    logits, input_ids = _logits(2, 5, 40, seed=9)
    enc = tg.encode(logits, input_ids, fmt="topk", k=3, vocab_size=40)
    for bad in (65536, 40, -1):
        ids = input_ids.clone()
        ids[1, 2] = bad
        with pytest.raises(ValueError, match=rf"input_ids holds token id {bad}, outside the vocabulary \[0, 40\)"):
            tg.build_table(enc, seq_id=[0, 1], input_ids=ids, policy_version=-1, fmt="topk", vocab_size=40)
    enc["topk_ids"][0] = enc["topk_ids"][0].astype(np.int64) + 40
    with pytest.raises(ValueError, match="topk_ids holds token id .* teacher.model"):
        tg.build_table(enc, seq_id=[0, 1], input_ids=input_ids, policy_version=-1, fmt="topk", vocab_size=40)
