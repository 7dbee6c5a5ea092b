"""Knowledge-distillation losses: pure tensor functions on student logits and `SparseTargets`.

Shapes: student_logits [B, T, V] (the model's `logits[:, :-1]`), labels [B, T] (`input_ids[:, 1:]`,
ignore_index where no loss is wanted), targets with [B, T, M] support tensors. Every function
upcasts to float32, averages over unmasked tokens, returns exactly 0.0 (with a valid, zero gradient)
on an all-masked batch, and never sends a gradient into the teacher targets.

Buckets. A sparse target is compared with the student on *buckets*: each stored support id, plus
for `topk` one tail bucket holding all the mass outside the support (teacher: `tail_logmass`;
student: logsumexp of its log-probs over the non-support ids). Dense targets use the full vocab.
The student distribution is always q = softmax(student_logits / T) over the FULL vocabulary,
gathered at the support ids, so support mass the student puts elsewhere is penalised.

Temperature T is applied to the student (logits / T) and to the teacher:
  dense:   log_softmax(log p / T)                              exact.
  topk:    log_softmax([log p_1..log p_k, log p_tail] / T)     exact on the support's relative weights;
           the tail is tempered as one atom, an approximation of the tempered mass outside the
           support (at T = 1 this only renormalises away float16 rounding).
  sampled: p_hat^(1/T) renormalised over the drawn ids         an approximation (the counts are an
           estimate of p, not of p^(1/T)); exact and unbiased at T = 1.
`kd_loss` is NOT multiplied by T^2; `distill_loss` is: alpha * T^2 * KD + (1 - alpha) * CE.

Losses (per token, summed over buckets b; p = teacher, q = student):
  forward_kl  KL(p || q) = sum p_b (log p_b - log q_b)        any format; with sampled targets its
              student gradient is an unbiased estimate of the dense one at T = 1.
  reverse_kl  KL(q || p) = sum q_b (log q_b - log p_b)        topk or dense.
  jsd         beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q (in log space), 0 < beta < 1.
  tvd         1/2 sum |p_b - q_b|                             topk or dense.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from raydistill.targets import SparseTargets

__all__ = ["LOSSES", "kd_loss", "ce_loss", "distill_loss", "temperature_at", "kd_per_token",
           "cross_entropy_per_token", "teacher_buckets", "student_buckets"]

LOSSES = ("forward_kl", "reverse_kl", "jsd", "tvd")
SCHEDULES = ("constant", "linear", "cosine")


def _has_tail(targets: SparseTargets, vocab: int) -> bool:
    # A top-k support covering the whole vocabulary leaves nothing for a tail bucket.
    return targets.kind == "topk" and targets.ids.shape[-1] < vocab


def teacher_buckets(targets: SparseTargets, temperature: float = 1.0,
                    vocab: int | None = None) -> torch.Tensor:
    """Teacher log-probs on the buckets at `temperature`, detached float32: [..., M] or [..., M+1].

    The last bucket is the tail for topk targets (unless k equals `vocab`). Padding buckets of
    sampled targets stay -inf.
    """
    lp = targets.logprobs.detach().float()
    if targets.kind == "topk" and (vocab is None or _has_tail(targets, vocab)):
        lp = torch.cat([lp, targets.tail_logmass.detach().float().unsqueeze(-1)], dim=-1)
    # log_softmax renormalises: tempering, float16 rounding, counts -> p_hat^(1/T).
    return F.log_softmax(lp / temperature, dim=-1)


def student_buckets(student_logprobs: torch.Tensor, targets: SparseTargets) -> torch.Tensor:
    """Student log-probs [..., V] (full vocab) gathered onto the buckets of `targets`.

    Padding buckets gather id 0: callers must weight them by the teacher's p = 0. The tail bucket is
    logsumexp over the non-support ids (exact and stable even when the tail mass is tiny).
    """
    if targets.ids is None:
        return student_logprobs
    ids = targets.ids.long()
    lq = student_logprobs.gather(-1, ids)
    if _has_tail(targets, student_logprobs.shape[-1]):
        rest = student_logprobs.scatter(-1, ids, float("-inf"))
        lq = torch.cat([lq, torch.logsumexp(rest, dim=-1, keepdim=True)], dim=-1)
    return lq


def _xlogy_terms(p: torch.Tensor, diff: torch.Tensor) -> torch.Tensor:
    # p * diff with 0 where p == 0 (padding, -inf log-probs): avoids 0 * inf = NaN in value and grad.
    return torch.where(p > 0, p * diff, torch.zeros_like(diff))


def _check_beta(jsd_beta: float) -> None:
    if not 0.0 < jsd_beta < 1.0:
        raise ValueError(f"train.jsd_beta must be strictly between 0 and 1, got {jsd_beta} — at the "
                         "limits use train.loss=forward_kl or reverse_kl")


def kd_per_token(student_logits: torch.Tensor, targets: SparseTargets, *, loss: str = "forward_kl",
                 temperature: float = 1.0, jsd_beta: float = 0.5) -> torch.Tensor:
    """Per-token KD loss: student_logits [..., V] and targets with the same leading dims -> [...] float32.

    No masking and no T^2: the building block of `kd_loss` (and of evaluation metrics).
    """
    if loss not in LOSSES:
        raise ValueError(f"train.loss={loss!r} is not one of {', '.join(LOSSES)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if targets.kind == "sampled" and loss != "forward_kl":
        raise ValueError(f"train.loss={loss} needs targets.format=topk (or dense targets): sampled "
                         "targets have no tail bucket for the mass the student puts outside the drawn "
                         "ids — use targets.format=topk or train.loss=forward_kl")
    vocab = student_logits.shape[-1]
    lq_all = F.log_softmax(student_logits.float() / temperature, dim=-1)
    lq = student_buckets(lq_all, targets)
    lp = teacher_buckets(targets, temperature, vocab)
    p = lp.exp()
    if loss == "forward_kl":
        return _xlogy_terms(p, lp - lq).sum(-1)
    q = lq.exp()
    if loss == "reverse_kl":
        return _xlogy_terms(q, lq - lp).sum(-1)
    if loss == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    _check_beta(jsd_beta)
    lm = torch.logaddexp(lp + math.log(jsd_beta), lq + math.log1p(-jsd_beta))
    return (jsd_beta * _xlogy_terms(p, lp - lm).sum(-1)
            + (1.0 - jsd_beta) * _xlogy_terms(q, lq - lm).sum(-1))


def cross_entropy_per_token(student_logits: torch.Tensor, targets: SparseTargets, *,
                            temperature: float = 1.0) -> torch.Tensor:
    """Soft cross-entropy H(p_buckets, q_buckets) = -sum_b p_b log q_b per token: [..., V] -> [...].

    Forward KL minus the (student-independent) teacher entropy: same student gradient.
    """
    lq = student_buckets(F.log_softmax(student_logits.float() / temperature, dim=-1), targets)
    p = teacher_buckets(targets, temperature, student_logits.shape[-1]).exp()
    return _xlogy_terms(p, -lq).sum(-1)


def _check_shapes(student_logits, labels, targets=None):
    if student_logits.dim() != 3 or labels.shape != student_logits.shape[:2]:
        raise ValueError(f"expected student_logits [B, T, V] and labels [B, T], got "
                         f"{tuple(student_logits.shape)} and {tuple(labels.shape)} — pass the model's "
                         "logits[:, :-1] and labels input_ids[:, 1:]")
    if targets is not None:
        if targets.logprobs.shape[:2] != labels.shape:
            raise ValueError(f"targets cover {tuple(targets.logprobs.shape[:2])} positions but labels are "
                             f"{tuple(labels.shape)} — targets describe input_ids[:, 1:]")
        if targets.ids is None and targets.logprobs.shape[-1] != student_logits.shape[-1]:
            raise ValueError(f"dense targets have {targets.logprobs.shape[-1]} classes, the student "
                             f"{student_logits.shape[-1]} — teacher and student must share the vocabulary")


def kd_loss(student_logits: torch.Tensor, targets: SparseTargets, labels: torch.Tensor, *,
            loss: str = "forward_kl", temperature: float = 1.0, jsd_beta: float = 0.5,
            ignore_index: int = -100) -> torch.Tensor:
    """KD loss, a scalar: mean over tokens with labels != ignore_index of `kd_per_token` (no T^2).

    student_logits [B, T, V] any float dtype; targets [B, T, ...]; labels [B, T].
    """
    _check_shapes(student_logits, labels, targets)
    mask = labels != ignore_index
    n = int(mask.sum())
    # Only unmasked rows are computed: masked rows can't leak NaN into the value or the gradient.
    per_tok = kd_per_token(student_logits[mask], targets.select(mask), loss=loss,
                           temperature=temperature, jsd_beta=jsd_beta)
    return per_tok.sum() / max(n, 1)


def ce_loss(student_logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Hard-label cross-entropy, mean over tokens with labels != ignore_index (0.0 if there are none).

    student_logits [B, T, V] any float dtype (upcast to float32); labels [B, T].
    """
    _check_shapes(student_logits, labels)
    vocab = student_logits.shape[-1]
    n = int((labels != ignore_index).sum())
    total = F.cross_entropy(student_logits.reshape(-1, vocab).float(), labels.reshape(-1).long(),
                            ignore_index=ignore_index, reduction="sum")
    return total / max(n, 1)


def distill_loss(student_logits: torch.Tensor, targets: SparseTargets, labels: torch.Tensor, *,
                 alpha: float, temperature: float = 1.0, loss: str = "forward_kl", jsd_beta: float = 0.5,
                 ignore_index: int = -100) -> tuple[torch.Tensor, dict[str, float]]:
    """alpha * T^2 * kd_loss + (1 - alpha) * ce_loss -> (total scalar, {"kd": float, "ce": float}).

    T^2 keeps the soft-target gradient scale independent of T. The KD term is not computed when
    alpha == 0, the CE term not when alpha == 1; a skipped term is reported as 0.0.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"train.alpha must be in [0, 1], got {alpha}")
    total = student_logits.new_zeros((), dtype=torch.float32)
    parts = {"kd": 0.0, "ce": 0.0}
    if alpha > 0:
        kd = kd_loss(student_logits, targets, labels, loss=loss, temperature=temperature,
                     jsd_beta=jsd_beta, ignore_index=ignore_index)
        total = total + alpha * temperature ** 2 * kd
        parts["kd"] = float(kd.detach())
    if alpha < 1:
        ce = ce_loss(student_logits, labels, ignore_index=ignore_index)
        total = total + (1.0 - alpha) * ce
        parts["ce"] = float(ce.detach())
    return total, parts


def temperature_at(schedule, *args) -> float:
    """Distillation temperature at `step` of `total_steps`.

    Either `temperature_at(kind, start, end, step, total_steps)` or
    `temperature_at(schedule, step, total_steps)` with a mapping / object having kind, start, end.
    kind: constant (start throughout), linear, or cosine (half-cosine from start to end). The step
    is clamped to [0, total_steps]; total_steps <= 0 gives `end`.
    """
    if isinstance(schedule, str):
        if len(args) != 4:
            raise TypeError("temperature_at(kind, start, end, step, total_steps)")
        kind, (start, end, step, total_steps) = schedule, args
    else:
        if len(args) != 2:
            raise TypeError("temperature_at(schedule, step, total_steps)")
        get = schedule.get if isinstance(schedule, dict) else (lambda k: getattr(schedule, k, None))
        kind, start, end = get("kind"), get("start"), get("end")
        step, total_steps = args
    if kind not in SCHEDULES:
        raise ValueError(f"train.temperature_schedule.kind={kind!r} is not one of {', '.join(SCHEDULES)}")
    if start is None:
        raise ValueError("train.temperature_schedule.start is required")
    start = float(start)
    end = start if end is None else float(end)
    if kind == "constant":
        return start
    frac = 1.0 if total_steps <= 0 else min(max(step / total_steps, 0.0), 1.0)
    if kind == "linear":
        return start + (end - start) * frac
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * frac))
