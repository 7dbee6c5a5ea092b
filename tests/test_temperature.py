"""Temperatures, the logged KD value and finite gradients on stored targets (issue 12, items 1-4).

References are float64 and dense. Each test states its tolerance beside the figure it was set from
(measured with this file's seeds on a 2-core CPU machine).
"""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from raydistill import targets as tg
from raydistill.config import load_config
from raydistill.errors import ConfigError
from raydistill.losses import LOSSES, distill_loss, kd_loss, kd_per_token, teacher_buckets

V, K = 32000, 20


def _teachers(n: int, seed: int) -> torch.Tensor:
    """n teacher positions over V: Zipf(a) logits (a in 0.8..2.5) on a random id order, and Gaussian
    logits (scale 1..6) — long-tailed and smooth teachers, [n, V] float32."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        if i % 2 == 0:
            a = 0.8 + 1.7 * torch.rand((), generator=g).item()
            z = -a * torch.arange(1, V + 1, dtype=torch.float64).log()
            rows.append(z[torch.randperm(V, generator=g)].float())
        else:
            rows.append(torch.randn(V, generator=g) * (1 + 5 * torch.rand((), generator=g).item()))
    return torch.stack(rows)


def _stored(teacher: torch.Tensor, fmt: str, capture_temperature: float = 1.0, samples: int = 50, seed: int = 0):
    """teacher [n, V] through the production path: encode -> build_table -> decode -> [1, n, ...]."""
    n = teacher.shape[0]
    logits = torch.cat([teacher, torch.zeros(1, V)]).unsqueeze(0)          # n + 1 tokens: n positions
    ids = torch.zeros(1, n + 1, dtype=torch.long)
    enc = tg.encode(logits, ids, fmt=fmt, k=K, samples=samples, capture_temperature=capture_temperature,
                    vocab_size=V, generator=torch.Generator().manual_seed(seed))
    table = tg.build_table(enc, seq_id=[0], input_ids=ids, policy_version=-1, fmt=fmt, vocab_size=V)
    return tg.decode(table, fmt)[1]


def _bucket_ref(student: torch.Tensor, teacher: torch.Tensor, ids: torch.Tensor, temperature: float):
    """float64 forward KL over the top-k buckets + one tail bucket, from the DENSE teacher tempered
    exactly: the tail's mass is sum_tail p_v^(1/T) / Z."""
    lp = F.log_softmax(F.log_softmax(teacher.double(), -1) / temperature, -1)
    lq = F.log_softmax(student / temperature, -1)

    def buckets(x):
        return torch.cat([x.gather(-1, ids), torch.logsumexp(x.scatter(-1, ids, float("-inf")), -1, keepdim=True)], -1)
    p, q = buckets(lp), buckets(lq)
    return (p.exp() * (p - q)).sum(-1).mean()


def _grad(fn, s):
    s = s.detach().clone().requires_grad_(True)
    out = fn(s)
    out.backward()
    return out.detach().double(), s.grad.double()


def _rel(a, b):
    return float((a - b).norm() / b.norm())


# ---------------------------------------------------------------- 1. topk re-tempered exactly

@pytest.mark.parametrize("temperature", [0.6, 1.0, 1.5, 2.0, 3.3, 5.0, 8.0])
def test_topk_tail_is_retempered_like_the_dense_teacher(temperature):
    """48 teachers (Zipf and Gaussian, V = 32,000, k = 20). The tempered tail mass the loss uses is
    within 2e-3 of the dense float64 one (measured max 5.3e-4 at T = 0.6, float16 storage included),
    and the loss value and student gradient match the float64 bucket reference within 1% (measured
    <= 0.04% / 0.23%). Tempering the stored tail log-mass as one atom (the code before) was off by
    up to 0.79 in tail mass at T = 2 on these teachers."""
    teacher = _teachers(48, seed=11)
    targets = _stored(teacher, "topk")
    ids = targets.ids[0]
    lp_dense = F.log_softmax(F.log_softmax(teacher.double(), -1) / temperature, -1)
    true_tail = torch.logsumexp(lp_dense.scatter(-1, ids, float("-inf")), -1).exp()
    used_tail = teacher_buckets(targets, temperature, V)[0, :, -1].double().exp()
    assert float((used_tail - true_tail).abs().max()) < 2e-3

    student = torch.randn(1, 48, V, generator=torch.Generator().manual_seed(5)) * 2
    labels = torch.zeros(1, 48, dtype=torch.long)
    got, g_got = _grad(lambda s: kd_loss(s, targets, labels, temperature=temperature), student)
    ref, g_ref = _grad(lambda s: _bucket_ref(s[0], teacher, ids, temperature), student.double())
    assert abs(float(got - ref)) <= 0.01 * float(ref) + 1e-4, (float(got), float(ref))
    assert _rel(g_got, g_ref) < 0.01


def test_topk_temperature_schedule_through_the_grid():
    """A schedule 5 -> 1 (the one users ask for) passes through grid points and between them: every
    step's gradient is within 1% of the exact-tail reference."""
    from raydistill.losses import temperature_at

    teacher = _teachers(16, seed=12)
    targets = _stored(teacher, "topk")
    student = torch.randn(1, 16, V, generator=torch.Generator().manual_seed(6))
    labels = torch.zeros(1, 16, dtype=torch.long)
    for step in range(0, 101, 10):
        temp = temperature_at("cosine", 5.0, 1.0, step, 100)
        _, g_got = _grad(lambda s: kd_loss(s, targets, labels, temperature=temp), student)
        _, g_ref = _grad(lambda s: _bucket_ref(s[0], teacher, targets.ids[0], temp), student.double())
        assert _rel(g_got, g_ref) < 0.01, (step, temp)


def test_topk_outside_the_grid_is_refused():
    targets = _stored(_teachers(2, seed=13), "topk")
    student, labels = torch.zeros(1, 2, V), torch.zeros(1, 2, dtype=torch.long)
    with pytest.raises(ValueError, match=r"train.temperature 20 is outside .*\(0.5 to 10\)"):
        kd_loss(student, targets, labels, temperature=20.0)
    # captured at T = 4, the same grid covers 2 .. 40
    hot = _stored(_teachers(2, seed=13), "topk", capture_temperature=4.0)
    assert torch.isfinite(kd_loss(student, hot, labels, temperature=20.0))


# ---------------------------------------------------------------- 2. sampled: only at the capture temperature

def test_sampled_at_another_temperature_is_refused():
    targets = _stored(_teachers(2, seed=14), "sampled")
    student, labels = torch.zeros(1, 2, V), torch.zeros(1, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="targets.capture_temperature 1") as e:
        kd_loss(student, targets, labels, temperature=2.0)
    assert "train.temperature" in str(e.value) and "topk" in str(e.value)


def _draws(teacher: torch.Tensor, draws: int, **encode_kw):
    """`draws` independent sampled captures of the teacher positions [n, vocab], as one batch of
    `draws` sequences through encode -> build_table -> decode: SparseTargets [draws, n, ...]."""
    n, vocab = teacher.shape
    logits = torch.cat([teacher, torch.zeros(1, vocab)]).expand(draws, n + 1, vocab)
    ids = torch.zeros(draws, n + 1, dtype=torch.long)
    enc = tg.encode(logits, ids, fmt="sampled", samples=50, vocab_size=vocab,
                    generator=torch.Generator().manual_seed(0), **encode_kw)
    table = tg.build_table(enc, seq_id=np.arange(draws), input_ids=ids, policy_version=-1, fmt="sampled",
                           vocab_size=vocab)
    return tg.decode(table, "sampled")[1]


def test_sampled_drawn_at_the_training_temperature_is_unbiased():
    """Captured at Tc = 2 (drawn from p_2), trained at T = 2: over 400 draws of N = 50 the mean student
    gradient matches the dense p_2 gradient to within 4 Monte-Carlo standard errors of the mean."""
    g = torch.Generator().manual_seed(15)
    vocab, n, draws = 200, 4, 400
    teacher = torch.randn(n, vocab, generator=g) * 3
    student = torch.randn(1, n, vocab, generator=g)
    labels = torch.zeros(1, n, dtype=torch.long)
    _, g_ref = _grad(lambda s: kd_loss(s, tg.from_logits(teacher.unsqueeze(0)), labels, temperature=2.0), student)
    t = _draws(teacher, draws, capture_temperature=2.0)
    # one student row per draw: the gradient of each row is that draw's gradient
    _, grads = _grad(lambda s: kd_loss(s, t, labels.expand(draws, n), temperature=2.0) * draws,
                     student.expand(draws, n, vocab))
    per_draw = float(((grads - g_ref) ** 2).sum(dim=(1, 2)).mean().sqrt() / g_ref.norm())
    floor = per_draw / math.sqrt(draws)
    assert _rel(grads.mean(0, keepdim=True), g_ref) < 4 * floor, (_rel(grads.mean(0), g_ref), floor)


def _cfg(tmp_path, *overrides):
    model = tmp_path / "m"
    model.mkdir(exist_ok=True)
    return load_config(overrides=[f"teacher.model={model}", "student.init_from_teacher={n_layer: 1}", *overrides])


def test_config_refuses_sampled_at_another_training_temperature(tmp_path):
    with pytest.raises(ConfigError) as e:
        _cfg(tmp_path, "targets.format=sampled", "train.temperature=2")
    msg = str(e.value)
    assert "train.temperature" in msg and "targets.capture_temperature" in msg and "topk" in msg
    with pytest.raises(ConfigError) as e:
        _cfg(tmp_path, "targets.format=sampled", "train.temperature_schedule={kind: linear, start: 4, end: 1}")
    assert "train.temperature_schedule" in str(e.value) and "targets.capture_temperature" in str(e.value)
    # fine: drawn at the training temperature; topk with a schedule inside its grid; online training
    _cfg(tmp_path, "targets.format=sampled", "train.temperature=2", "targets.capture_temperature=2")
    _cfg(tmp_path, "targets.format=topk", "train.temperature_schedule={kind: cosine, start: 5, end: 1}")
    _cfg(tmp_path, "targets.format=sampled", "train.temperature=2", "train.online=true")
    with pytest.raises(ConfigError, match="train.temperature_schedule.*0.5 to 10"):
        _cfg(tmp_path, "targets.format=topk", "train.temperature_schedule={kind: linear, start: 20, end: 1}")


# ---------------------------------------------------------------- 3. finite gradients

@pytest.mark.parametrize("loss", LOSSES)
def test_minus_inf_student_logits_give_finite_gradients(loss):
    """A student logit of -inf (a masked-out vocabulary entry) with dense or topk targets: the value is
    finite, so every gradient entry must be (reverse KL / JSD gave NaN everywhere)."""
    g = torch.Generator().manual_seed(16)
    teacher = torch.randn(1, 6, 40, generator=g)
    teacher[..., 7] = float("-inf")                         # the teacher never says token 7 either
    student = torch.randn(1, 6, 40, generator=g)
    student[..., 7] = float("-inf")
    labels = torch.zeros(1, 6, dtype=torch.long)
    lp = F.log_softmax(teacher, -1)
    vals, ids = lp.topk(5, -1)
    topk = tg.SparseTargets(ids, vals, torch.logsumexp(lp.scatter(-1, ids, float("-inf")), -1),
                            torch.zeros(1, 6), "topk")
    for targets in (tg.from_logits(teacher), topk):
        for temp in (1.0,) if targets.kind == "topk" else (1.0, 2.0):
            s = student.clone().requires_grad_(True)
            out = kd_loss(s, targets, labels, loss=loss, temperature=temp)
            out.backward()
            assert torch.isfinite(out), (targets.kind, temp)
            assert torch.isfinite(s.grad).all(), (targets.kind, temp, s.grad)
            assert float(s.grad[..., 7].abs().max()) == 0.0


# ---------------------------------------------------------------- 4. the logged KD value

def test_logged_kd_of_sampled_targets_is_the_dense_kl():
    """Over 300 draws of N = 50 (Zipf(1.1) teachers, V = 2,000), the logged "kd" of sampled targets is
    within 4 standard errors of the dense KL(p || q); the plug-in value sum p_hat (log p_hat - log q)
    it replaces is biased upward (by ~60% here)."""
    vocab, n, draws = 2000, 8, 300
    g = torch.Generator().manual_seed(17)
    z = -1.1 * torch.arange(1, vocab + 1, dtype=torch.float64).log()
    teacher = torch.stack([z[torch.randperm(vocab, generator=g)] for _ in range(n)]).float()
    student = torch.randn(1, n, vocab, generator=g)
    labels = torch.zeros(1, n, dtype=torch.long)
    dense_kl = float(kd_loss(student, tg.from_logits(teacher.unsqueeze(0)), labels))
    t = _draws(teacher, draws)
    rows = student.expand(draws, n, vocab)
    logged = distill_loss(rows, t, labels.expand(draws, n), alpha=1.0)[1]["kd"]   # the mean over draws
    per_draw = kd_per_token(rows, t).mean(-1)
    se = float(per_draw.std() / math.sqrt(draws))
    assert abs(logged - dense_kl) < 4 * se + 2e-3, (logged, dense_kl, se)   # 2e-3: float16 entropy rounding
    plug_in = float(kd_per_token(rows, replace(t, entropy=None)).mean())     # without the stored entropy
    assert plug_in > 1.2 * dense_kl                                          # the old number really was off


def test_dense_and_topk_logged_values_are_named():
    """Dense: the exact KL. topk: the k + 1 bucket KL, a lower bound of the dense KL."""
    teacher = _teachers(8, seed=18).unsqueeze(0)
    student = torch.randn(1, 8, V, generator=torch.Generator().manual_seed(7))
    labels = torch.zeros(1, 8, dtype=torch.long)
    lp, lq = F.log_softmax(teacher.double(), -1), F.log_softmax(student.double(), -1)
    exact = float((lp.exp() * (lp - lq)).sum(-1).mean())
    assert distill_loss(student, tg.from_logits(teacher), labels, alpha=1.0)[1]["kd"] == pytest.approx(exact, rel=1e-5)
    bucket = distill_loss(student, _stored(teacher[0], "topk"), labels, alpha=1.0)[1]["kd"]
    assert bucket <= exact + 1e-3
