"""Chunked (fused LM head + loss) KD against today's loss on full logits; chunked teacher encode
against `targets.encode`. Fast, no Ray: pure tensors and tiny HF models built from config.

Tolerances (float32 everywhere, the reference is `losses.distill_loss` on F.linear's full logits):
values and gradients agree to rtol 1e-5 / atol 1e-6 (only the summation order over chunks differs).
bf16 hidden states and weights: against the bf16 full-logit path, value rtol 1e-4 and gradients
within 1e-2 of their max |element| (bf16's 8-bit mantissa rounds each chunk's g^T h once); against
the float32 reference, value rtol 2e-2.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from raydistill import targets as tg
from raydistill.chunked_loss import (CHUNK_LOGITS, TeacherHead, chunk_tokens_for, encode_chunked,
                                     fused_distill_loss, model_hidden, use_fused)
from raydistill.losses import LOSSES, distill_loss

B, L, H, V = 3, 9, 16, 97
T = L - 1
CHUNK = 5  # 24 rows -> chunks of 5 with a remainder: boundaries inside sequences


def _teacher_targets(fmt, seed=0, temperature=1.0):
    """Targets as a store holds them. Sampled ones are captured at the training temperature (counts
    can't be re-tempered); topk / dense at 1, so that the loss re-tempers them."""
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(B, L, V, generator=g) * 2.5
    input_ids = torch.randint(0, V, (B, L), generator=g)
    if fmt == "dense":
        return input_ids, tg.from_logits(teacher[:, :-1], input_ids[:, 1:])
    capture = temperature if fmt == "sampled" else 1.0
    enc = tg.encode(teacher, input_ids, fmt=fmt, k=7, samples=50, capture_temperature=capture, vocab_size=V,
                    generator=torch.Generator().manual_seed(seed + 1))
    table = tg.build_table(enc, seq_id=np.arange(B), input_ids=input_ids, policy_version=-1, fmt=fmt,
                           vocab_size=V)
    return tg.decode(table, fmt)


def _student(seed=1, bias=True, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.4
    b = torch.randn(V, generator=g) * 0.1 if bias else None
    return [None if t is None else t.to(dtype).requires_grad_(True) for t in (hidden, weight, b)]


def _labels(input_ids, mask):
    labels = input_ids[:, 1:].clone()
    if mask == "partial":
        labels[0, :3] = -100
        labels[1, 4] = labels[2, -1] = -100
    elif mask == "all":
        labels[:] = -100
    return labels


def _grads(total, params):
    params = [p for p in params if p is not None]
    return torch.autograd.grad(total, params, allow_unused=False)


def _both(fmt, loss, temperature, mask, alpha=0.6, bias=True, dtype=torch.float32, ref_dtype=None):
    input_ids, targets = _teacher_targets(fmt, temperature=temperature)
    labels = _labels(input_ids, mask)
    kw = dict(alpha=alpha, temperature=temperature, loss=loss, jsd_beta=0.3)
    h, w, b = _student(bias=bias, dtype=dtype)
    got, got_parts = fused_distill_loss(h, w, targets, labels, bias=b, chunk_tokens=CHUNK, **kw)
    g_got = _grads(got, (h, w, b))
    rd = ref_dtype or dtype
    hr, wr, br = [None if t is None else t.detach().to(rd).requires_grad_(True) for t in (h, w, b)]
    ref, ref_parts = distill_loss(F.linear(hr, wr, br), targets, labels, **kw)
    g_ref = _grads(ref, (hr, wr, br))
    return (got, got_parts, g_got), (ref, ref_parts, g_ref)


CASES = [(fmt, loss) for fmt in ("sampled", "topk", "dense") for loss in LOSSES
         if fmt != "sampled" or loss == "forward_kl"]


@pytest.mark.parametrize("mask", ["none", "partial"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("fmt,loss", CASES)
def test_chunked_equals_full_logits(fmt, loss, temperature, mask):
    (got, got_parts, g_got), (ref, ref_parts, g_ref) = _both(fmt, loss, temperature, mask)
    assert got.dtype == torch.float32 and got.dim() == 0
    assert float(ref.detach()) > 0.01  # a real loss, not a trivially matching zero
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert got_parts == pytest.approx(ref_parts, rel=1e-5, abs=1e-6)
    for name, a, r in zip(("hidden", "weight", "bias"), g_got, g_ref):
        assert a.dtype == r.dtype, name
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_alpha_limits_skip_a_term(alpha):
    (got, parts, g_got), (ref, ref_parts, g_ref) = _both("topk", "jsd", 2.0, "partial", alpha=alpha)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert parts == pytest.approx(ref_parts, rel=1e-5, abs=1e-6)
    assert (parts["kd"] == 0.0) == (alpha == 0.0) and (parts["ce"] == 0.0) == (alpha == 1.0)
    for a, r in zip(g_got, g_ref):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6)


def test_hard_labels_only_without_targets():
    input_ids, _ = _teacher_targets("topk")
    labels = _labels(input_ids, "partial")
    h, w, b = _student()
    got, parts = fused_distill_loss(h, w, None, labels, bias=b, alpha=0.0, chunk_tokens=CHUNK)
    ref = F.cross_entropy(F.linear(h, w, b).reshape(-1, V), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert parts["kd"] == 0.0 and parts["ce"] == pytest.approx(float(ref.detach()), rel=1e-5)


@pytest.mark.parametrize("fmt,loss", [("sampled", "forward_kl"), ("topk", "reverse_kl"), ("dense", "tvd")])
def test_all_masked_gives_zero_and_zero_grads(fmt, loss):
    (got, parts, g_got), (ref, _, _) = _both(fmt, loss, 2.0, "all")
    assert float(got) == 0.0 == float(ref) and parts == {"kd": 0.0, "ce": 0.0}
    for g in g_got:
        assert torch.isfinite(g).all() and not g.any()


@pytest.mark.parametrize("chunk", [1, 7, 24, 1000])
def test_chunk_size_does_not_change_the_result(chunk):
    input_ids, targets = _teacher_targets("topk")
    labels = _labels(input_ids, "partial")
    h, w, b = _student()
    ref, _ = fused_distill_loss(h, w, targets, labels, bias=b, alpha=0.5, loss="jsd", chunk_tokens=3)
    got, _ = fused_distill_loss(h, w, targets, labels, bias=b, alpha=0.5, loss="jsd", chunk_tokens=chunk)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fmt,loss", [("sampled", "forward_kl"), ("topk", "jsd"), ("dense", "reverse_kl")])
def test_bf16_hidden_and_weight(fmt, loss):
    # Against the same bf16 inputs through today's path (full bf16 logits, float32 loss) ...
    (got, parts, g_got), (ref, ref_parts, g_ref) = _both(fmt, loss, 2.0, "partial", dtype=torch.bfloat16)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    for a, r in zip(g_got, g_ref):
        assert a.dtype == torch.bfloat16
        assert (a.float() - r.float()).abs().max() <= 1e-2 * r.float().abs().max()
    # ... and against the float32 reference on the same (bf16-representable) numbers.
    (got32, _, _), (ref32, _, _) = _both(fmt, loss, 2.0, "partial", dtype=torch.bfloat16,
                                        ref_dtype=torch.float32)
    torch.testing.assert_close(got32, ref32, rtol=2e-2, atol=1e-3)


def test_auto_chunk_holds_a_fixed_number_of_logits():
    assert chunk_tokens_for(128_256) == CHUNK_LOGITS // 128_256 == 65
    assert chunk_tokens_for(262_144) == 32 and chunk_tokens_for(32_000) == 262
    assert chunk_tokens_for(10 ** 9) == 16 and chunk_tokens_for(97, 5) == 5
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="loss_chunk_tokens"):
            chunk_tokens_for(97, bad)


def test_auto_fused_only_when_the_logits_exceed_a_chunk():
    assert use_fused(None, tokens=8 * 2047, vocab=128_256)      # a Llama-3 micro-batch: 130-token chunks
    assert not use_fused(None, tokens=16 * 127, vocab=2048)     # the demo: one chunk holds every logit
    assert use_fused(True, tokens=1, vocab=2) and not use_fused(False, tokens=10 ** 6, vocab=128_256)


def test_no_grad_gives_values_only():
    input_ids, targets = _teacher_targets("topk")
    labels = _labels(input_ids, "partial")
    h, w, b = _student()
    with torch.no_grad():
        got, parts = fused_distill_loss(h, w, targets, labels, bias=b, alpha=0.5, chunk_tokens=CHUNK)
        ref, ref_parts = distill_loss(F.linear(h, w, b), targets, labels, alpha=0.5)
    assert not got.requires_grad
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_bad_input_names_the_problem():
    input_ids, targets = _teacher_targets("sampled")
    labels = _labels(input_ids, "none")
    h, w, b = _student()
    with pytest.raises(ValueError, match="loss_chunk_tokens"):
        fused_distill_loss(h, w, targets, labels, alpha=0.5, chunk_tokens=0)
    with pytest.raises(ValueError, match=r"weight must be \[V, H=16\]"):
        fused_distill_loss(h, w[:, :8], targets, labels, alpha=0.5)
    with pytest.raises(ValueError, match="targets.format=topk"):  # from losses.kd_per_token, inherited
        fused_distill_loss(h, w, targets, labels, alpha=0.5, loss="tvd")
    with pytest.raises(ValueError, match="train.alpha"):
        fused_distill_loss(h, w, targets, labels, alpha=1.5)


# ------------------------------------------------------------------------------------- teacher side

def _hidden_ids(seed=3, bsz=B, seq_len=L, vocab=V):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(bsz, seq_len, H, generator=g)
    weight = torch.randn(vocab, H, generator=g)
    bias = torch.randn(vocab, generator=g) * 0.1
    return hidden, weight, bias, torch.randint(0, vocab, (bsz, seq_len), generator=g)


def _assert_same_columns(got: dict, ref: dict, n: int = B):
    assert got.keys() == ref.keys()
    for col in ref:
        assert len(got[col]) == len(ref[col]) == n, col
        for a, r in zip(got[col], ref[col]):
            assert np.asarray(a).dtype == np.asarray(r).dtype, col
            np.testing.assert_array_equal(a, r, err_msg=col)


@pytest.mark.parametrize("chunk", [1, 3, 8, 9, 20, 1000])  # windows within a sequence, whole groups
@pytest.mark.parametrize("fmt", ["sampled", "topk"])
def test_encode_chunked_equals_encode(fmt, chunk):
    hidden, weight, bias, ids = _hidden_ids()
    kw = dict(fmt=fmt, k=6, samples=50, capture_temperature=1.0, vocab_size=V)
    ref = tg.encode(F.linear(hidden, weight, bias), ids, generator=torch.Generator().manual_seed(7), **kw)
    got = encode_chunked(hidden, weight, ids, bias=bias, chunk_tokens=chunk,
                         generator=torch.Generator().manual_seed(7), **kw)
    _assert_same_columns(got, ref)
    if fmt == "sampled":
        assert all(int(c.sum()) == 50 * T for c in got["sample_counts"])
        assert all(len(s) == T for s in got["sample_len"])


def test_encode_chunked_bad_input():
    hidden, weight, bias, ids = _hidden_ids()
    with pytest.raises(ValueError, match="loss_chunk_tokens"):
        encode_chunked(hidden, weight, ids, chunk_tokens=0, fmt="topk", k=3, capture_temperature=1.0,
                       vocab_size=V)
    with pytest.raises(ValueError, match="targets.k"):  # encode's own check, inherited
        encode_chunked(hidden, weight, ids, chunk_tokens=4, fmt="topk", k=0, capture_temperature=1.0,
                       vocab_size=V)


# ------------------------------------------------------------------------------- a 128k-vocab Llama

LLAMA_V = 128_256


def _llama(seed, hidden=16):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=LLAMA_V, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


@pytest.fixture(scope="module")
def llama_pair():
    teacher, student = _llama(0, hidden=32).eval(), _llama(1, hidden=16)
    ids = torch.randint(0, LLAMA_V, (2, 12), generator=torch.Generator().manual_seed(5))
    return teacher, student, ids


def _per_position(enc: dict, fmt: str) -> list:
    """Each position's stored target as a tuple (ids, counts) / (ids,), sequence-major."""
    out = []
    for b in range(len(enc["label_logprob"])):
        if fmt == "topk":
            out += [tuple(r) for r in enc["topk_ids"][b].reshape(-1, 8)]
        else:
            cuts = np.cumsum(enc["sample_len"][b].astype(np.int64))[:-1]
            out += [(tuple(i), tuple(c)) for i, c in zip(np.split(enc["sample_ids"][b], cuts),
                                                        np.split(enc["sample_counts"][b], cuts))]
    return out


@pytest.mark.parametrize("fmt", ["sampled", "topk"])
def test_llama_128k_teacher_encode_chunked(llama_pair, fmt):
    teacher, _, ids = llama_pair
    kw = dict(fmt=fmt, k=8, samples=50, capture_temperature=1.0, vocab_size=LLAMA_V)
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    with torch.inference_mode():
        hidden, weight, bias = model_hidden(teacher, ids)
        assert hidden.shape == (2, 12, 32) and weight.shape == (LLAMA_V, 32) and bias is None
        # Exact: one chunk per sequence, logits bitwise those of a per-sequence head matmul.
        per_seq = torch.cat([F.linear(hidden[b:b + 1], weight) for b in range(2)])
        _assert_same_columns(encode_chunked(hidden, weight, ids, chunk_tokens=11, generator=gen(), **kw),
                             tg.encode(per_seq, ids, generator=gen(), **kw), n=2)
        # Against the model's own full logits with chunks cutting sequences: a chunk's matmul may
        # round a logit 1 ulp differently (the BLAS kernel depends on the row count), which can move
        # a draw that lands on a boundary to the neighbouring id; everything else is identical.
        ref = tg.encode(teacher(input_ids=ids).logits, ids, generator=gen(), **kw)
        got = encode_chunked(hidden, weight, ids, chunk_tokens=5, generator=gen(), **kw)
    same = np.mean([a == r for a, r in zip(_per_position(got, fmt), _per_position(ref, fmt))])
    assert same >= 0.9, same
    for a, r in zip(got["label_logprob"], ref["label_logprob"]):
        assert a.shape == (11,)
        np.testing.assert_allclose(a.astype(np.float32), r.astype(np.float32), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("fmt,loss,temperature", [("sampled", "forward_kl", 1.0), ("topk", "jsd", 2.0)])
def test_llama_128k_student_fused_path(llama_pair, fmt, loss, temperature):
    teacher, student, ids = llama_pair
    with torch.inference_mode():
        enc = tg.encode(teacher(input_ids=ids).logits, ids, fmt=fmt, k=8, samples=50, capture_temperature=1.0,
                        vocab_size=LLAMA_V, generator=torch.Generator().manual_seed(3))
    table = tg.build_table(enc, seq_id=np.arange(2), input_ids=ids, policy_version=-1, fmt=fmt,
                           vocab_size=LLAMA_V)
    _, targets = tg.decode(table, fmt)
    labels = ids[:, 1:].clone()
    labels[0, :4] = -100  # a prompt that carries no loss
    kw = dict(alpha=0.5, temperature=temperature, loss=loss)
    params = [p for p in student.parameters()]

    student.zero_grad()
    ref, ref_parts = distill_loss(student(input_ids=ids).logits[:, :-1], targets, labels, **kw)
    ref.backward()
    g_ref = [p.grad.clone() for p in params]

    student.zero_grad()
    hidden, weight, bias = model_hidden(student, ids)
    got, parts = fused_distill_loss(hidden[:, :-1], weight, targets, labels, bias=bias, chunk_tokens=4, **kw)
    got.backward()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert parts == pytest.approx(ref_parts, rel=1e-5, abs=1e-6)
    for (name, p), g in zip(student.named_parameters(), g_ref):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6, msg=name)
    assert student.lm_head.weight.grad.abs().sum() > 0


def test_model_hidden_refuses_a_model_that_scales_its_logits():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, logit_scale=0.5)
    model = LlamaForCausalLM(cfg)
    with pytest.raises(ValueError, match="logit_scale.*train.fused_loss=false"):
        model_hidden(model, torch.zeros(1, 4, dtype=torch.long))


# ---------------------------------------------------------------------------------------- eval

def test_eval_metrics_chunked_equal_dense(tiny_dir, llama_pair):
    """evaluate's CE / KL / agreement summed chunk by chunk of positions (5 rows; a 128k Llama's auto
    chunk) equal the dense full-batch reference (test_evaluate._reference), also over a loss mask."""
    from transformers import AutoModelForCausalLM

    from raydistill.chunked_loss import RowLogProbs
    from raydistill.evaluate import evaluate
    from test_evaluate import _reference

    student = AutoModelForCausalLM.from_pretrained(str(tiny_dir / "gpt2-student"))
    teacher = AutoModelForCausalLM.from_pretrained(str(tiny_dir / "llama-teacher"))
    ids = torch.randint(0, student.config.vocab_size, (7, 11), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert not RowLogProbs(student, ids).full and not RowLogProbs(teacher, ids).full  # head-only chunks
    cases = [(student, teacher, ids, 5), (llama_pair[1], llama_pair[0], llama_pair[2], None)]
    for s, t, x, chunk in cases:
        s_ce, t_ce, kl, agree = _reference(s, t, x)
        out = evaluate(s, t, x, batch_size=3, chunk_tokens=chunk)
        assert out["tokens"] == x[:, 1:].numel()
        assert out["student"]["ce"] == pytest.approx(s_ce, rel=1e-5)
        assert out["teacher"]["ce"] == pytest.approx(t_ce, rel=1e-5)
        assert out["student"]["kl_teacher_student"] == pytest.approx(kl, rel=1e-5, abs=1e-6)
        assert out["student"]["top1_agreement"] == pytest.approx(agree, abs=1.0 / out["tokens"])

    mask = torch.ones_like(ids)
    mask[:, :6] = 0  # the first 5 positions predict prompt tokens: no loss
    keep = mask[:, 1:].bool()
    with torch.no_grad():
        s_lp = F.log_softmax(student.eval()(input_ids=ids).logits[:, :-1].float(), -1)[keep]
        t_lp = F.log_softmax(teacher.eval()(input_ids=ids).logits[:, :-1].float(), -1)[keep]
    labels = ids[:, 1:][keep]
    out = evaluate(student, teacher, ids, batch_size=2, chunk_tokens=4, loss_mask=mask)
    assert out["tokens"] == int(keep.sum())
    assert out["student"]["ce"] == pytest.approx(F.nll_loss(s_lp, labels).item(), rel=1e-5)
    kl = F.kl_div(s_lp, t_lp, log_target=True, reduction="batchmean").item()
    assert out["student"]["kl_teacher_student"] == pytest.approx(kl, rel=1e-5)


# ------------------------------------------------------------------ online: the teacher's head per chunk
# Today's online loss: the teacher's full logits cut to W, `from_logits` dense targets, `distill_loss`
# on the student's full logits. `TeacherHead` makes both models' logits chunk by chunk; float32, the
# same tolerances as above (rtol 1e-5 / atol 1e-6; per-parameter gradients of a Llama rtol 1e-4).

HT = 24  # the teacher's hidden size differs from the student's


def _online_both(loss, temperature, mask, *, alpha=0.6, width=V, teacher_rows=V + 6, chunk=CHUNK):
    g = torch.Generator().manual_seed(11)
    t_hidden = torch.randn(B, T, HT, generator=g)
    t_weight = torch.randn(teacher_rows, HT, generator=g) * 0.5  # rows >= width: head padding
    t_bias = torch.randn(teacher_rows, generator=g) * 0.1
    input_ids = torch.randint(0, width, (B, L), generator=g)
    labels = _labels(input_ids, mask)
    kw = dict(alpha=alpha, temperature=temperature, loss=loss, jsd_beta=0.3)
    h, w, b = _student()
    head = TeacherHead.cut(t_hidden, t_weight, t_bias, width)
    got, got_parts = fused_distill_loss(h, w, head, labels, bias=b, chunk_tokens=chunk, **kw)
    g_got = _grads(got, (h, w, b))
    hr, wr, br = [t.detach().clone().requires_grad_(True) for t in (h, w, b)]
    targets = tg.from_logits(F.linear(t_hidden, t_weight, t_bias)[..., :width].float(), labels)
    ref, ref_parts = distill_loss(F.linear(hr, wr, br), targets, labels, **kw)
    g_ref = _grads(ref, (hr, wr, br))
    return (got, got_parts, g_got), (ref, ref_parts, g_ref)


def _assert_same(got_all, ref_all):
    (got, got_parts, g_got), (ref, ref_parts, g_ref) = got_all, ref_all
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert got_parts == pytest.approx(ref_parts, rel=1e-5, abs=1e-6)
    for name, a, r in zip(("hidden", "weight", "bias"), g_got, g_ref):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("mask", ["none", "partial"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("loss", LOSSES)
def test_online_teacher_head_equals_full_logits(loss, temperature, mask):
    got, ref = _online_both(loss, temperature, mask)
    assert float(ref[0].detach()) > 0.01 and ref[1]["kd"] > 0.01 and ref[1]["ce"] > 0.01
    _assert_same(got, ref)


@pytest.mark.parametrize("loss", ["forward_kl", "jsd", "tvd"])
def test_online_teacher_head_narrower_than_the_student(loss):
    # W < V: the teacher's p is 0 on the student's extra rows, as for padded dense targets.
    _assert_same(*_online_both(loss, 2.0, "partial", width=V - 7))


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_online_teacher_head_alpha_limits_and_all_masked(alpha):
    got, ref = _online_both("jsd", 2.0, "partial", alpha=alpha, chunk=1)
    _assert_same(got, ref)
    assert (got[1]["kd"] == 0.0) == (alpha == 0.0) and (got[1]["ce"] == 0.0) == (alpha == 1.0)
    (zero, parts, grads), _ = _online_both("forward_kl", 1.0, "all", alpha=alpha)
    assert float(zero.detach()) == 0.0 and parts == {"kd": 0.0, "ce": 0.0} and not any(g.any() for g in grads)


def test_online_teacher_head_bad_input():
    h, w, b = _student()
    labels = torch.zeros(B, T, dtype=torch.long)
    with pytest.raises(ValueError, match=r"head has 90 rows, fewer than the run's width W=97"):
        TeacherHead.cut(torch.zeros(B, T, HT), torch.zeros(90, HT), None, V)
    wide = TeacherHead.cut(torch.zeros(B, T, HT), torch.zeros(V + 3, HT), None, None)
    with pytest.raises(ValueError, match="dense targets have 100 classes, the student 97"):
        fused_distill_loss(h, w, wide, labels, alpha=0.5)
    with pytest.raises(ValueError, match=r"targets cover \(3, 7\) positions"):
        fused_distill_loss(h, w, TeacherHead.cut(torch.zeros(B, T - 1, HT), torch.zeros(V, HT), None, V),
                           labels, alpha=0.5)
    with pytest.raises(ValueError, match="train.loss=reverse_kl: dense teacher targets cover 90"):
        fused_distill_loss(h, w, TeacherHead.cut(torch.zeros(B, T, HT), torch.zeros(V, HT), None, 90),
                           labels, alpha=0.5, loss="reverse_kl")


@pytest.mark.parametrize("loss,temperature", [("forward_kl", 1.0), ("reverse_kl", 2.0), ("jsd", 2.0),
                                              ("tvd", 1.0)])
def test_llama_128k_online_step(llama_pair, loss, temperature):
    """A V = 128,256 teacher and student: the teacher's hidden states + head per chunk give today's
    online loss (its full logits -> from_logits) and the student's parameter gradients."""
    teacher, student, ids = llama_pair
    labels = ids[:, 1:].clone()
    labels[0, :4] = -100
    kw = dict(alpha=0.5, temperature=temperature, loss=loss)
    params = list(student.parameters())
    with torch.inference_mode():
        targets = tg.from_logits(teacher(input_ids=ids).logits[:, :-1].float(), labels)
    student.zero_grad()
    ref, ref_parts = distill_loss(student(input_ids=ids).logits[:, :-1], targets, labels, **kw)
    ref.backward()
    g_ref = [p.grad.clone() for p in params]

    student.zero_grad()
    with torch.no_grad():
        t_hidden, t_weight, t_bias = model_hidden(teacher, ids)
    head = TeacherHead.cut(t_hidden[:, :-1], t_weight, t_bias, LLAMA_V)
    hidden, weight, bias = model_hidden(student, ids)
    got, parts = fused_distill_loss(hidden[:, :-1], weight, head, labels, bias=bias, chunk_tokens=5, **kw)
    got.backward()
    assert float(ref.detach()) > 0.01
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert parts == pytest.approx(ref_parts, rel=1e-5, abs=1e-6)
    for (name, p), g in zip(student.named_parameters(), g_ref):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6, msg=name)
    assert student.lm_head.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("loss", ["forward_kl", "tvd"])
def test_trainer_online_step_fused_equals_full_logits(llama_pair, loss):
    """train.py's own online step (Trainer.targets_for + loss_step, no Ray): fused_loss=true (the
    teacher's head in the chunks) against fused_loss=false (today's full-logit path), same batch."""
    import copy
    from types import SimpleNamespace

    import pyarrow as pa

    from raydistill.tasks.causal_lm import CausalLM
    from raydistill.train import Trainer

    teacher, student, ids = llama_pair
    batch = pa.table({"input_ids": pa.array(ids.tolist(), type=pa.list_(pa.int64()))})
    out = {}
    for fused in (False, True):
        tr = Trainer.__new__(Trainer)  # only the attributes these stages read
        tr.cfg = SimpleNamespace(train=SimpleNamespace(loss=loss, jsd_beta=0.5, grad_accum=1, fused_loss=fused,
                                                       loss_chunk_tokens=4))
        tr.plan = SimpleNamespace(alpha=0.5, vocab_size=LLAMA_V, label="test", reads="inputs")
        tr.task, tr.teacher, tr.device, tr.amp, tr.fused = CausalLM(None), teacher, torch.device("cpu"), False, None
        tr.model = copy.deepcopy(student)
        inputs, targets = tr.targets_for(batch)
        assert isinstance(targets, TeacherHead) == fused
        loss_value, parts = tr.loss_step(inputs, targets, 2.0, sync=True)
        out[fused] = loss_value.detach(), parts, {n: p.grad for n, p in tr.model.named_parameters()}
    (got, parts, grads), (ref, ref_parts, ref_grads) = out[True], out[False]
    assert float(ref) > 0.01
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert parts == pytest.approx(ref_parts, rel=1e-5, abs=1e-6)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6, msg=name)
