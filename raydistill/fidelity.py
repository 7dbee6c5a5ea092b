"""Fidelity of a cached soft-target format: how well the stored targets stand in for the dense
teacher (captured mass, cross-entropy bias, gradient angle). Used by the benchmarks (bench row 5)
and the format tests; kept out of `targets` so that `targets` and `losses` do not import each other.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from raydistill import losses
from raydistill.targets import SparseTargets, from_logits

__all__ = ["fidelity"]


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
