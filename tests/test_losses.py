"""KD losses against dense references: values and gradients, masking, temperature, sampled unbiasedness."""
from __future__ import annotations

import math
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from raydistill import targets as tg
from raydistill.losses import LOSSES, ce_loss, distill_loss, kd_loss, kd_per_token, temperature_at
from raydistill.targets import SparseTargets

B, T, V = 2, 7, 50


def _setup(seed=0, scale_t=2.0, scale_s=1.5):
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(B, T, V, generator=g) * scale_t
    student = torch.randn(B, T, V, generator=g) * scale_s
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, 1] = labels[1, 4] = labels[1, 6] = -100
    return teacher, student, labels


def _topk(teacher, k):
    """Top-k targets built exactly in float32 (what encode stores, before float16 rounding)."""
    lp = F.log_softmax(teacher.float(), -1)
    vals, ids = lp.topk(k, -1)
    rest = lp.scatter(-1, ids, float("-inf"))
    tail = torch.logsumexp(rest, -1).clamp(min=tg.FP16_MIN)
    return SparseTargets(ids, vals, tail, torch.zeros(teacher.shape[:2]), "topk", tail_pow=_tail_pow(rest))


def _tail_pow(rest):
    """Tail log-mass log sum p^b and its slope at the stored exponents, straight from the definition."""
    fin = rest.double().nan_to_num(neginf=0.0)
    f = [torch.logsumexp(b * rest.double(), -1).clamp(min=tg.FP16_MIN) for b in tg.TAIL_BETAS]
    d = [(torch.softmax(b * rest.double(), -1).nan_to_num(0.0) * fin).sum(-1) for b in tg.TAIL_BETAS]
    return torch.stack(f + d, -1).float()


def _dense_ref(s, t, labels, loss, temperature=1.0, beta=0.5):
    """Full-vocab reference in float64: mean over unmasked tokens."""
    lp = F.log_softmax(t.double() / temperature, -1)
    lq = F.log_softmax(s.double() / temperature, -1)
    return _bucket_ref(lp, lq, labels, loss, beta)


def _bucket_ref(lp, lq, labels, loss, beta=0.5):
    p, q = lp.exp(), lq.exp()
    if loss == "forward_kl":
        per = (p * (lp - lq)).sum(-1)
    elif loss == "reverse_kl":
        per = (q * (lq - lp)).sum(-1)
    elif loss == "tvd":
        per = 0.5 * (p - q).abs().sum(-1)
    else:
        m = beta * p + (1 - beta) * q
        per = beta * (p * (lp - m.log())).sum(-1) + (1 - beta) * (q * (lq - m.log())).sum(-1)
    mask = labels != -100
    return per[mask].sum() / mask.sum()


def _value_and_grad(fn, s):
    s = s.detach().clone().requires_grad_(True)
    out = fn(s)
    out.backward()
    return out.detach(), s.grad


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_full_vocab_topk_equals_dense(loss, temperature):
    teacher, student, labels = _setup()
    targets = _topk(teacher, V)                             # support = everything, tail clamped to -65504
    got, g_got = _value_and_grad(lambda s: kd_loss(s, targets, labels, loss=loss, temperature=temperature), student)
    ref, g_ref = _value_and_grad(lambda s: _dense_ref(s, teacher, labels, loss, temperature), student.double())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g_got.double(), g_ref, atol=1e-5, rtol=1e-4)
    # the same with dense targets
    dense = tg.from_logits(teacher)
    got_d, g_d = _value_and_grad(lambda s: kd_loss(s, dense, labels, loss=loss, temperature=temperature), student)
    torch.testing.assert_close(got_d.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g_d.double(), g_ref, atol=1e-5, rtol=1e-4)


def _tail_bucket_ref(s, targets, labels, loss, temperature, beta=0.5, teacher=None):
    """Hand-written buckets (support ids + one tail), float64, q_tail = 1 - sum of support q.

    The teacher's tempered tail is the dense one, sum over the tail of p_v^(1/T) (not the tail atom
    tempered as one, which is what a stored log-mass alone would give)."""
    lp_dense = F.log_softmax(teacher.double(), -1)
    tail = torch.logsumexp(lp_dense.scatter(-1, targets.ids, float("-inf")) / temperature, -1)
    z = torch.cat([targets.logprobs.double() / temperature, tail.unsqueeze(-1)], -1)
    lp = F.log_softmax(z, -1)                                  # re-tempered, renormalised teacher buckets
    q_full = F.softmax(s.double() / temperature, -1)
    q_sup = q_full.gather(-1, targets.ids)
    q = torch.cat([q_sup, (1 - q_sup.sum(-1, keepdim=True))], -1)
    return _bucket_ref(lp, q.log(), labels, loss, beta)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_topk_with_tail_bucket_matches_hand_computation(loss, temperature):
    teacher, student, labels = _setup(seed=1)
    targets = _topk(teacher, 5)
    # at T = 1 the teacher's tail bucket is exactly 1 - sum of the top-k p
    p = F.softmax(teacher.double(), -1)
    torch.testing.assert_close(targets.tail_logmass.double().exp(), 1 - p.topk(5, -1).values.sum(-1))
    got, g_got = _value_and_grad(
        lambda s: kd_loss(s, targets, labels, loss=loss, temperature=temperature, jsd_beta=0.3), student)
    ref, g_ref = _value_and_grad(
        lambda s: _tail_bucket_ref(s, targets, labels, loss, temperature, beta=0.3, teacher=teacher),
        student.double())
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g_got.double(), g_ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("k", [5, V])
def test_student_equal_to_teacher_gives_zero(k):
    teacher, _, labels = _setup(seed=2)
    targets = _topk(teacher, k)
    for loss in LOSSES:
        assert abs(float(kd_loss(teacher, targets, labels, loss=loss, temperature=1.0))) < 1e-5, loss


def test_forward_kl_equals_kl_div_convention():
    teacher, student, labels = _setup(seed=3)
    temp = 2.0
    got = kd_loss(student, tg.from_logits(teacher), labels, temperature=temp)
    per = F.kl_div(F.log_softmax(student / temp, -1), F.log_softmax(teacher / temp, -1),
                   log_target=True, reduction="none").sum(-1)
    mask = labels != -100
    torch.testing.assert_close(got, per[mask].mean(), atol=1e-6, rtol=1e-6)
    # and not the swapped (reverse) one
    swapped = F.kl_div(F.log_softmax(teacher / temp, -1), F.log_softmax(student / temp, -1),
                       log_target=True, reduction="none").sum(-1)[mask].mean()
    assert abs(float(got - swapped)) > 1e-2


def test_ce_loss_and_distill_loss_t_squared():
    teacher, student, labels = _setup(seed=4)
    targets = _topk(teacher, 8)
    ce = ce_loss(student, labels)
    torch.testing.assert_close(ce, F.cross_entropy(student.reshape(-1, V), labels.reshape(-1), ignore_index=-100))
    kd = kd_loss(student, targets, labels, temperature=2.0)
    total, parts = distill_loss(student, targets, labels, alpha=0.3, temperature=2.0)
    torch.testing.assert_close(total, 0.3 * 4.0 * kd + 0.7 * ce)
    assert parts == pytest.approx({"kd": float(kd), "ce": float(ce)})
    total0, parts0 = distill_loss(student, targets, labels, alpha=0.0, temperature=2.0)
    torch.testing.assert_close(total0, ce)
    assert parts0["kd"] == 0.0
    total1, parts1 = distill_loss(student, targets, labels, alpha=1.0, temperature=2.0, loss="jsd")
    torch.testing.assert_close(total1, 4.0 * kd_loss(student, targets, labels, loss="jsd", temperature=2.0))
    assert parts1["ce"] == 0.0
    with pytest.raises(ValueError, match="alpha"):
        distill_loss(student, targets, labels, alpha=1.5, temperature=1.0)


def test_sampled_forward_kl_gradient_is_unbiased():
    vocab, seq_len, copies, samples = 20, 7, 400, 50
    g = torch.Generator().manual_seed(7)
    teacher = torch.randn(1, seq_len, vocab, generator=g) * 1.5
    student0 = torch.randn(1, seq_len - 1, vocab, generator=g)
    input_ids = torch.zeros(copies, seq_len, dtype=torch.long)
    enc = tg.encode(teacher.expand(copies, -1, -1), input_ids, fmt="sampled", samples=samples,
                    vocab_size=vocab, generator=torch.Generator().manual_seed(8))
    _, targets = tg.decode(tg.build_table(enc, seq_id=range(copies), input_ids=input_ids, policy_version=-1,
                                          fmt="sampled", vocab_size=vocab), "sampled")
    labels = torch.zeros(copies, seq_len - 1, dtype=torch.long)

    s = student0.clone().requires_grad_(True)
    kd_loss(s.expand(copies, -1, -1), targets, labels).backward()      # mean over draws of each gradient
    g_mean = s.grad
    s1 = student0.clone().requires_grad_(True)
    one_draw = SparseTargets(targets.ids[:1], targets.logprobs[:1], None, targets.label_logprob[:1], "sampled")
    kd_loss(s1, one_draw, labels[:1]).backward()
    g_one = s1.grad
    sd = student0.clone().requires_grad_(True)
    kd_loss(sd, tg.from_logits(teacher[:, :-1]), labels[:1]).backward()
    g_dense = sd.grad
    # gradient = (q - p_hat) / tokens: its error is the error of the mean of copies*samples draws
    p = F.softmax(teacher[:, :-1].double(), -1)
    sigma = (p * (1 - p) / (copies * samples)).sqrt() / (seq_len - 1)
    assert ((g_mean.double() - g_dense.double()).abs() < 5 * sigma + 1e-7).all()
    assert (g_one - g_dense).abs().max() > 3 * (g_mean - g_dense).abs().max()   # the test has power


def _all_kinds(teacher):
    lp = F.log_softmax(teacher, -1)
    sampled_ids = lp.topk(6, -1).indices
    sampled_lp = torch.full(sampled_ids.shape, -math.log(6.0))
    sampled_lp[..., 4:] = float("-inf")                             # two padding slots (id 0 there)
    sampled_ids[..., 4:] = 0
    sampled_lp[..., :4] = -math.log(4.0)
    return {"dense": tg.from_logits(teacher), "topk": _topk(teacher, 5), "topk_full": _topk(teacher, V),
            "sampled": SparseTargets(sampled_ids, sampled_lp, None, torch.zeros(B, T), "sampled")}


@pytest.mark.parametrize("loss", LOSSES)
def test_all_masked_batch_gives_zero_and_finite_grads(loss):
    teacher, student, _ = _setup(seed=5)
    labels = torch.full((B, T), -100)
    for name, targets in _all_kinds(teacher).items():
        if name == "sampled" and loss != "forward_kl":
            continue
        if name == "sampled":  # sampled targets are used only at their capture temperature
            targets = replace(targets, capture_temperature=2.0)
        for s_dtype in (torch.float32, torch.bfloat16):
            s = student.detach().to(s_dtype).clone().requires_grad_(True)
            out = kd_loss(s, targets, labels, loss=loss, temperature=2.0)
            assert out.item() == 0.0 and out.requires_grad
            out.backward()
            assert torch.isfinite(s.grad).all() and (s.grad == 0).all()
    s = student.clone().requires_grad_(True)
    total, parts = distill_loss(s, _topk(teacher, 5), labels, alpha=0.5, temperature=2.0, loss=loss)
    total.backward()
    assert total.item() == 0.0 and parts == {"kd": 0.0, "ce": 0.0} and (s.grad == 0).all()
    assert ce_loss(student, labels).item() == 0.0


@pytest.mark.parametrize("loss", LOSSES)
def test_masked_positions_contribute_nothing(loss):
    teacher, student, labels = _setup(seed=6)
    targets = _topk(teacher, 5)
    ref = kd_loss(student, targets, labels, loss=loss)
    # garbage (NaN) targets and logits at masked positions change nothing, not even the gradient
    bad = SparseTargets(targets.ids, targets.logprobs.clone(), targets.tail_logmass.clone(),
                        targets.label_logprob, "topk")
    bad.logprobs[labels == -100] = float("nan")
    bad.tail_logmass[labels == -100] = float("nan")
    s = student.clone()
    s[labels == -100] = float("nan")
    s.requires_grad_(True)
    out = kd_loss(s, bad, labels, loss=loss)
    out.backward()
    torch.testing.assert_close(out, ref)
    assert torch.isfinite(s.grad).all() and (s.grad[labels == -100] == 0).all()


def test_sampled_padding_is_ignored():
    teacher, student, labels = _setup(seed=7)
    targets = _all_kinds(teacher)["sampled"]
    support = SparseTargets(targets.ids[..., :4], targets.logprobs[..., :4], None, targets.label_logprob, "sampled")
    for temp in (1.0, 3.0):  # (captured at temp: sampled targets are used only at that temperature)
        torch.testing.assert_close(kd_loss(student, replace(targets, capture_temperature=temp), labels, temperature=temp),
                                   kd_loss(student, replace(support, capture_temperature=temp), labels,
                                           temperature=temp))
    # at T = 1: sum over the drawn ids of p_hat * (log p_hat - log q), q over the full vocab
    lq = F.log_softmax(student.double(), -1).gather(-1, targets.ids[..., :4])
    per = (0.25 * (math.log(0.25) - lq)).sum(-1)
    torch.testing.assert_close(kd_loss(student, targets, labels).double(), per[labels != -100].mean())


def test_teacher_targets_get_no_gradient():
    teacher, student, labels = _setup(seed=8)
    t = teacher.clone().requires_grad_(True)
    lp = F.log_softmax(t, -1)
    vals, ids = lp.topk(5, -1)
    sparse = SparseTargets(ids, vals, torch.logsumexp(lp.scatter(-1, ids, float("-inf")), -1),
                           torch.zeros(B, T), "topk")
    dense = SparseTargets(None, lp, None, torch.zeros(B, T), "dense")
    s = student.clone().requires_grad_(True)
    total = sum(kd_loss(s, tgt, labels, loss=loss) for tgt in (sparse, dense) for loss in LOSSES)
    total = total + distill_loss(s, tg.from_logits(t), labels, alpha=0.5, temperature=2.0)[0]
    total.backward()
    assert t.grad is None and s.grad is not None


def test_low_precision_student_logits_are_upcast():
    teacher, student, labels = _setup(seed=9)
    targets = _topk(teacher, 5)
    bf = student.to(torch.bfloat16)
    for loss in LOSSES:
        a = kd_loss(bf, targets, labels, loss=loss)
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, kd_loss(bf.float(), targets, labels, loss=loss))


def test_errors_name_the_fix():
    teacher, student, labels = _setup()
    sampled = _all_kinds(teacher)["sampled"]
    for loss in ("reverse_kl", "jsd", "tvd"):
        with pytest.raises(ValueError, match="targets.format=topk"):
            kd_loss(student, sampled, labels, loss=loss)
    with pytest.raises(ValueError, match="jsd_beta"):
        kd_loss(student, _topk(teacher, 5), labels, loss="jsd", jsd_beta=1.0)
    with pytest.raises(ValueError, match="train.loss"):
        kd_loss(student, _topk(teacher, 5), labels, loss="kl")
    with pytest.raises(ValueError, match=r"logits\[:, :-1\]"):
        kd_loss(torch.randn(B, T + 1, V), _topk(teacher, 5), labels)


def test_temperature_schedules():
    for kind in ("constant", "linear", "cosine"):
        assert temperature_at(kind, 4.0, 1.0, 0, 10) == 4.0
    assert temperature_at("constant", 4.0, 1.0, 10, 10) == 4.0
    assert temperature_at("linear", 4.0, 1.0, 5, 10) == pytest.approx(2.5)
    assert temperature_at("linear", 4.0, 1.0, 10, 10) == pytest.approx(1.0)
    assert temperature_at("linear", 4.0, 1.0, 25, 10) == pytest.approx(1.0)     # clamped
    assert temperature_at("linear", 4.0, 1.0, -3, 10) == pytest.approx(4.0)
    assert temperature_at("cosine", 4.0, 1.0, 5, 10) == pytest.approx(2.5)
    assert temperature_at("cosine", 4.0, 1.0, 10, 10) == pytest.approx(1.0)
    assert temperature_at("cosine", 4.0, 1.0, 2.5, 10) == pytest.approx(1.0 + 3.0 * (1 + math.cos(math.pi / 4)) / 2)
    assert temperature_at("cosine", 4.0, 1.0, 3, 0) == 1.0
    assert temperature_at({"kind": "linear", "start": 2.0, "end": 1.0}, 5, 10) == pytest.approx(1.5)
    assert temperature_at(SimpleNamespace(kind="cosine", start=2.0, end=1.0), 10, 10) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="kind"):
        temperature_at("step", 1.0, 1.0, 0, 1)


@settings(max_examples=15, deadline=None, database=None, derandomize=True)
@given(seed=st.integers(0, 10_000), k=st.integers(1, 11), temp=st.floats(0.5, 4.0),
       beta=st.floats(0.05, 0.95), scale=st.floats(0.1, 8.0))
def test_losses_are_bounded_divergences(seed, k, temp, beta, scale):
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(3, 12, generator=g) * scale
    student = torch.randn(3, 12, generator=g) * scale
    targets = _topk(teacher.unsqueeze(0), k)
    targets = SparseTargets(targets.ids[0], targets.logprobs[0], targets.tail_logmass[0], torch.zeros(3), "topk",
                            tail_pow=targets.tail_pow[0])
    vals = {loss: kd_per_token(student, targets, loss=loss, temperature=temp, jsd_beta=beta) for loss in LOSSES}
    for loss, v in vals.items():
        assert torch.isfinite(v).all() and (v >= -1e-5).all(), loss
    assert (vals["tvd"] <= 1 + 1e-6).all()
    # JSD(beta) <= h(beta), the binary entropy
    assert (vals["jsd"] <= -(beta * math.log(beta) + (1 - beta) * math.log(1 - beta)) + 1e-5).all()
