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

Widths. The student's head may be wider than the teacher's targets (ids < W, dense rows of W
columns: models.ModelInfo, W = the narrowest head); its softmax stays over its whole head (mass on
padding rows is real student mass) and the teacher has probability 0 beyond W: dense targets are
padded with -inf, a topk tail bucket holds the student's padding rows. The reverse KL of dense
targets is then infinite wherever q > 0 beyond W, and refused.

Temperature. The stored targets describe p_Tc (Tc = the capture temperature they carry); at
training temperature T the teacher is p_T ∝ p_Tc^b with b = Tc / T, the student q_T = softmax(s / T):
  dense:   log_softmax(b log p)                                 exact.
  topk:    support b log p_i, exact relative weights; tail log sum_tail p_v^b, interpolated from the
           stored tail_pow (see targets: tail-mass error <= 2.4e-4 absolute for T/Tc in [0.5, 10]);
           refused outside that range. At T = Tc the stored tail_logmass is used as is.
  sampled: counts estimate p_Tc only, so T must equal Tc (p_hat^(1/T) is a biased estimate of
           p_T): other temperatures are refused, naming targets.capture_temperature.
`kd_loss` is NOT multiplied by T^2; `distill_loss` is: alpha * T^2 * KD + (1 - alpha) * CE.

Losses (per token, summed over buckets b; p = teacher, q = student):
  forward_kl  KL(p || q) = sum p_b (log p_b - log q_b)        any format. sampled: the cross-entropy
              estimate -sum p_hat log q minus the stored dense entropy H(p): an unbiased estimate
              of the dense KL (the plug-in sum p_hat log p_hat is biased upward by the entropy of
              p_hat); its student gradient is unbiased too. topk: KL over the k + 1 buckets, a lower
              bound of the dense KL (the tail's inner distribution is not stored).
  reverse_kl  KL(q || p) = sum q_b (log q_b - log p_b)        topk or dense.
  jsd         beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q (in log space), 0 < beta < 1.
  tvd         1/2 sum |p_b - q_b|                             topk or dense.
Gradients are finite wherever the value is (zero-probability buckets never multiply 0 by -inf).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from raydistill.config import LOSSES, SCHEDULES
from raydistill.targets import TAIL_BETAS, SparseTargets

__all__ = ["LOSSES", "kd_loss", "ce_loss", "distill_loss", "temperature_at", "kd_per_token",
           "cross_entropy_per_token", "teacher_buckets", "student_buckets"]


def _has_tail(targets: SparseTargets, vocab: int) -> bool:
    # A top-k support covering the whole vocabulary leaves nothing for a tail bucket.
    return targets.kind == "topk" and targets.ids.shape[-1] < vocab


def teacher_buckets(targets: SparseTargets, temperature: float = 1.0,
                    vocab: int | None = None) -> torch.Tensor:
    """Teacher log-probs on the buckets at `temperature`, detached float32: [..., M] or [..., M+1].

    The last bucket is the tail for topk targets (unless k equals `vocab`). Padding buckets of
    sampled targets stay -inf. Raises ValueError where the stored data cannot give p_T exactly
    (sampled at T != Tc) or within the stated error (topk outside the tail grid).
    """
    b = _exponent(targets, temperature)
    lp = targets.logprobs.detach().float() * b
    if targets.kind == "topk" and (vocab is None or _has_tail(targets, vocab)):
        if math.isclose(b, 1.0, rel_tol=1e-6):
            tail = targets.tail_logmass.detach().float()
        else:
            tail = _tail_at(targets, b)
        lp = torch.cat([lp, tail.unsqueeze(-1)], dim=-1)
    # log_softmax renormalises: tempering, float16 rounding.
    lp = F.log_softmax(lp, dim=-1)
    if _padded(targets, vocab):  # a wider student: the teacher's p is 0 on its extra rows
        lp = F.pad(lp, (0, vocab - lp.shape[-1]), value=float("-inf"))
    return lp


def _padded(targets: SparseTargets, vocab: int | None) -> bool:
    """Dense targets narrower than the student's `vocab` columns (module docstring, Widths)."""
    return targets.ids is None and vocab is not None and targets.logprobs.shape[-1] < vocab


def _exponent(targets: SparseTargets, temperature: float) -> float:
    """b = Tc / T, the power that takes the stored p_Tc to p_T; refused where it would be wrong."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    tc = targets.capture_temperature
    b = tc / temperature
    if targets.kind == "sampled" and not math.isclose(b, 1.0, rel_tol=1e-6):
        raise ValueError(f"train.temperature {temperature:g} differs from targets.capture_temperature {tc:g}: "
                         "sampled counts estimate the teacher at the capture temperature only (re-tempering "
                         "them is biased) — set train.temperature (and train.temperature_schedule) to "
                         f"{tc:g}, capture at the training temperature, or use targets.format=topk")
    if targets.kind == "topk" and not min(TAIL_BETAS) <= b <= max(TAIL_BETAS) * (1 + 1e-6):
        lo, hi = tc / max(TAIL_BETAS), tc / min(TAIL_BETAS)
        raise ValueError(f"train.temperature {temperature:g} is outside what topk targets captured at "
                         f"targets.capture_temperature {tc:g} can re-temper ({lo:g} to {hi:g}) — keep "
                         "train.temperature and the schedule in that range, or capture at another temperature")
    return b


def _tail_at(targets: SparseTargets, b: float) -> torch.Tensor:
    """log sum_tail p_v^b by cubic Hermite interpolation of the stored values and slopes (convex in b)."""
    if targets.tail_pow is None:
        raise ValueError("these topk targets carry no tail_pow (written by an older raydistill): they can be "
                         "used only at their capture temperature — re-run the teacher pass to re-temper them")
    g, tp = len(TAIL_BETAS), targets.tail_pow.detach().float()
    i = min(j for j in range(g - 1) if TAIL_BETAS[j + 1] <= b)     # TAIL_BETAS descend
    hi, lo = TAIL_BETAS[i], TAIL_BETAS[i + 1]
    h = hi - lo
    s = min(max((b - lo) / h, 0.0), 1.0)
    h00, h10, h01, h11 = 2 * s**3 - 3 * s**2 + 1, s**3 - 2 * s**2 + s, -2 * s**3 + 3 * s**2, s**3 - s**2
    return (h00 * tp[..., i + 1] + h10 * h * tp[..., g + i + 1]
            + h01 * tp[..., i] + h11 * h * tp[..., g + i])


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
        lq = torch.cat([lq, _safe_logsumexp(rest).unsqueeze(-1)], dim=-1)
    return lq


def _xlogy_terms(p: torch.Tensor, diff: torch.Tensor) -> torch.Tensor:
    # p * diff with 0 where p == 0 (padding, -inf log-probs). diff is masked *before* the product:
    # where(p > 0, p * diff, 0) has a NaN gradient there, because its backward multiplies 0 by -inf.
    return p * torch.where(p > 0, diff, torch.zeros_like(diff))


def _safe_logsumexp(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    # logsumexp of an all -inf row is -inf, but its backward is NaN (exp(-inf - -inf)): mask those rows.
    empty = torch.isneginf(x).all(dim=dim, keepdim=True)
    out = torch.logsumexp(torch.where(empty, torch.zeros_like(x), x), dim=dim, keepdim=True)
    return torch.where(empty, torch.full_like(out, float("-inf")), out).squeeze(dim)


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
    if targets.kind == "sampled" and loss != "forward_kl":
        raise ValueError(f"train.loss={loss} needs targets.format=topk (or dense targets): sampled "
                         "targets have no tail bucket for the mass the student puts outside the drawn "
                         "ids — use targets.format=topk or train.loss=forward_kl")
    vocab = student_logits.shape[-1]
    if loss == "reverse_kl" and _padded(targets, vocab):
        raise ValueError(f"train.loss=reverse_kl: dense teacher targets cover {targets.logprobs.shape[-1]} ids, "
                         f"the student's head {vocab}: KL(q || p) is infinite where the student puts mass on "
                         "its extra (padding) rows — use forward_kl, jsd or tvd, or topk targets")
    lq_all = F.log_softmax(student_logits.float() / temperature, dim=-1)
    lq = student_buckets(lq_all, targets)
    lp = teacher_buckets(targets, temperature, vocab)
    p = lp.exp()
    if loss == "forward_kl":
        if targets.kind == "sampled" and targets.entropy is not None:
            return _xlogy_terms(p, -lq).sum(-1) - targets.entropy.float()   # unbiased: CE - H
        return _xlogy_terms(p, lp - lq).sum(-1)
    q = lq.exp()
    if loss == "reverse_kl":
        return _xlogy_terms(q, lq - lp).sum(-1)
    if loss == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    _check_beta(jsd_beta)
    # Buckets where both are 0 have m = 0; mask them so logaddexp's backward sees no -inf - -inf.
    none = (p == 0) & (q == 0)
    zero = torch.zeros_like(lp)
    lm = torch.logaddexp(torch.where(none, zero, lp + math.log(jsd_beta)),
                         torch.where(none, zero, lq + math.log1p(-jsd_beta)))
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
        if targets.ids is None and targets.logprobs.shape[-1] > student_logits.shape[-1]:
            raise ValueError(f"dense targets have {targets.logprobs.shape[-1]} classes, the student "
                             f"{student_logits.shape[-1]} — cut the teacher's logits to the shared width "
                             "(models.ModelInfo.vocab_size)")


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

    "kd" is the KD term's value: an unbiased estimate of the dense divergence for dense and sampled
    targets (sampled forward KL: cross-entropy minus the stored entropy), the bucket divergence (a
    lower bound) for topk.

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
