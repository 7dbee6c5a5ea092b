"""Memory-bounded KD at large vocabularies: the LM head and the loss fused, chunk by chunk.

At V = 128k a float32 row of logits is 0.5 MB; a train step at 16k tokens would hold several
float32 copies of [tokens, V] (logits, log-softmax, their gradients). Here the student's final
hidden states [B, T, H] and the LM-head weight [V, H] (+ bias) go in, and the logits of at most
`chunk_tokens` tokens exist at any time, forward and backward:

  student  `fused_distill_loss`  = `losses.distill_loss` on `F.linear(hidden, weight, bias)`, same
           value and gradients (w.r.t. hidden, weight, bias). Each chunk's logits are computed,
           the per-token loss functions of `losses` are applied to them (so every loss, format,
           temperature and fix there is inherited, not rewritten), the chunk's logit gradient is
           taken at once and pushed through the head (grad_hidden rows, grad_weight += g^T h), and
           the chunk is dropped. backward() only scales those gradients by the incoming scalar.
           Why not checkpointed chunks recomputed in backward: same peak, one more head matmul and
           softmax per chunk (bench/vocab_rows.py measures both).
  teacher  `encode_chunked` = `targets.encode` on the full logits, chunk by chunk of positions:
           same columns, same top-k, and (on CPU) the same sampled ids and counts for the same
           generator, because the rows are drawn in the same row-major order.
  online   `TeacherHead`: dense targets kept as the teacher's final hidden states + its head cut to
           the shared width W; `fused_distill_loss` makes each chunk's teacher logits (no grad) next
           to the student's and turns them into dense targets (`targets.from_logits`, what the online
           loss builds from full logits), so neither model's [B, T, V] logits ever exist.
  eval     `RowLogProbs`: float32 log-probs of rows [lo, hi) of a batch's predicting positions, the
           head applied to those rows only (evaluate.py's KL / CE / agreement sum chunk by chunk).

`model_hidden` runs a HF causal LM (DDP-wrapped or not) so that it returns its final hidden states
and head instead of full logits (`logits_to_keep=1`), and checks once that the head re-applied to
them reproduces the model's own logits (models that scale or soft-cap logits are refused).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from raydistill.losses import ce_loss, kd_per_token
from raydistill.targets import SparseTargets, encode, from_logits

__all__ = ["CHUNK_LOGITS", "chunk_tokens_for", "use_fused", "fused_distill_loss", "TeacherHead", "encode_chunked",
           "fused_head_problem", "model_hidden", "RowLogProbs"]

# Chunk size when none is given (train.loss_chunk_tokens: null): a chunk holds about CHUNK_LOGITS
# logits, so its memory is the same at every vocabulary (about 7 float32 copies of it exist during a
# chunk: 0.22 GiB at 2^23; online, the teacher's chunk adds about as much). bench/vocab_rows.py
# measured 3.4 MiB per chunk token at V = 128,256 and no slower steps down to 64 tokens per chunk;
# 2^23 (65 tokens at 128k) gave a train-step peak 0.16x of full logits at 1.09x the speed
# (README, "Large vocabularies").
CHUNK_LOGITS = 2 ** 23
MIN_CHUNK_TOKENS = 16


def chunk_tokens_for(vocab: int, chunk_tokens: int | None = None) -> int:
    """Tokens per chunk: `chunk_tokens` if given (>= 1), else CHUNK_LOGITS // vocab (at least 16)."""
    if chunk_tokens is None:
        return max(MIN_CHUNK_TOKENS, CHUNK_LOGITS // max(int(vocab), 1))
    if not (isinstance(chunk_tokens, int) and not isinstance(chunk_tokens, bool) and chunk_tokens >= 1):
        raise ValueError(f"train.loss_chunk_tokens must be an integer >= 1 or null (auto), got {chunk_tokens!r}")
    return chunk_tokens


# ---------------------------------------------------------------------------------------- student

def _check(hidden, weight, bias, targets, labels, alpha) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"train.alpha must be in [0, 1], got {alpha}")
    if hidden.dim() != 3 or labels.shape != hidden.shape[:2]:
        raise ValueError(f"expected hidden [B, T, H] and labels [B, T], got {tuple(hidden.shape)} and "
                         f"{tuple(labels.shape)} — pass the final hidden states [:, :-1] and input_ids[:, 1:]")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"the LM-head weight must be [V, H={hidden.shape[-1]}], got {tuple(weight.shape)}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"the LM-head bias must be [V={weight.shape[0]}], got {tuple(bias.shape)}")
    if targets is not None:
        # A TeacherHead is dense targets whose [B, T, W] log-probs are made chunk by chunk.
        head = isinstance(targets, TeacherHead)
        positions = targets.hidden.shape[:2] if head else targets.logprobs.shape[:2]
        width = targets.weight.shape[0] if head else targets.logprobs.shape[-1]
        if positions != labels.shape:
            raise ValueError(f"targets cover {tuple(positions)} positions but labels are "
                             f"{tuple(labels.shape)} — targets describe input_ids[:, 1:]")
        if (head or targets.ids is None) and width > weight.shape[0]:  # narrower: losses pads
            raise ValueError(f"dense targets have {width} classes, the student "
                             f"{weight.shape[0]} — cut the teacher's logits to the shared width "
                             "(models.ModelInfo.vocab_size)")


def _mm_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the head matmul runs in: autocast's if it is on (as `lm_head(hidden)` would), else promoted."""
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _chunk_loss(logits, tgt, lab, spec) -> tuple[torch.Tensor, torch.Tensor]:
    """(KD sum, CE sum) over a chunk's rows, from the per-token functions of `losses`."""
    zero = logits.new_zeros((), dtype=torch.float32)
    kd = ce = zero
    if spec["alpha"] > 0:
        kd = kd_per_token(logits, tgt, loss=spec["loss"], temperature=spec["temperature"],
                          jsd_beta=spec["jsd_beta"]).sum()
    if spec["alpha"] < 1:
        ce = ce_loss(logits[None], lab[None]) * lab.numel()  # a mean over the chunk's rows -> their sum
    return kd, ce


def _total(kd, ce, n, spec) -> torch.Tensor:
    t = spec["temperature"]
    return (spec["alpha"] * t * t * kd + (1.0 - spec["alpha"]) * ce) / max(n, 1)


def _chunks(n: int, size: int):
    # One (possibly empty) chunk even when n == 0: the loss functions still validate their arguments.
    return [(lo, min(lo + size, n)) for lo in range(0, max(n, 1), size)]


class _FusedHeadKD(torch.autograd.Function):
    """Loss over rows [n, H] with the head applied per chunk; gradients computed in the forward loop."""

    @staticmethod
    def forward(ctx, h, weight, bias, tgt, lab, spec):
        n, mm = h.shape[0], spec["mm_dtype"]
        w, b = weight.to(mm), None if bias is None else bias.to(mm)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(h) if need_h else None
        # float32 accumulators: the sum over chunks of g^T h must not round at every chunk in bf16.
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        kd_sum = ce_sum = h.new_zeros((), dtype=torch.float32)
        with torch.autocast(h.device.type, enabled=False):  # dtypes are explicit here
            for lo, hi in _chunks(n, spec["chunk_tokens"]):
                hc = h[lo:hi].to(mm)
                with torch.enable_grad():
                    logits = F.linear(hc, w, b).float().requires_grad_(True)
                    kd, ce = _chunk_loss(logits, _chunk_targets(tgt, lo, hi), lab[lo:hi], spec)
                    g, = torch.autograd.grad(_total(kd, ce, n, spec), logits)
                kd_sum, ce_sum = kd_sum + kd.detach(), ce_sum + ce.detach()
                g = g.to(mm)
                if need_h:
                    grad_h[lo:hi] = g @ w
                if need_w:
                    grad_w.add_(g.t() @ hc)
                if need_b:
                    grad_b.add_(g.sum(0))
                del logits, g  # the chunk's [rows, V] tensors go before the next chunk's come
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (h.dtype, weight.dtype, None if bias is None else bias.dtype)
        parts = torch.stack([kd_sum, ce_sum]) / max(n, 1)
        ctx.mark_non_differentiable(parts)
        return _total(kd_sum, ce_sum, n, spec), parts

    @staticmethod
    def backward(ctx, grad_out, _grad_parts):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        out = []
        for g, dt in zip((grad_h, grad_w, grad_b), ctx.dtypes):
            out.append(None if g is None else (g * grad_out).to(dt))
        return (*out, None, None, None)


@dataclass
class TeacherHead:
    """Online dense targets as the teacher's final hidden states and head, logits made per chunk.

    hidden [B, T, Ht] (or [N, Ht] rows) at the positions that predict input_ids[:, 1:], weight [W, Ht]
    and bias [W] | None: the teacher's head cut to the shared width W (`cut`). A chunk's targets are
    `targets.from_logits(F.linear(hidden, weight, bias).float())`, what today's online step builds
    from the teacher's full logits[..., :W]; the head runs in the teacher's dtype, as its forward does.
    """
    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None = None

    @classmethod
    def cut(cls, hidden, weight, bias, width: int | None) -> "TeacherHead":
        """The teacher's head rows [:width] (None: all) — ids >= W are head padding, not tokens."""
        if width is not None and width > weight.shape[0]:
            raise ValueError(f"the online teacher's head has {weight.shape[0]} rows, fewer than the run's width "
                             f"W={width} (models.ModelInfo.vocab_size)")
        w = slice(None) if width is None else slice(0, width)
        return cls(hidden.detach(), weight.detach()[w], None if bias is None else bias.detach()[w])

    def select(self, mask) -> "TeacherHead":
        """Rows where `mask` ([B, T] bool) is true, or a slice of rows, like `SparseTargets.select`."""
        return replace(self, hidden=self.hidden[mask])

    def dense(self) -> SparseTargets:
        """Dense targets [..., W] of these rows (float32 log-softmax of their logits, detached)."""
        with torch.no_grad():
            return from_logits(F.linear(self.hidden.to(self.weight.dtype), self.weight, self.bias).float())


def _chunk_targets(tgt, lo: int, hi: int) -> SparseTargets:
    part = tgt.select(slice(lo, hi))
    return part.dense() if isinstance(part, TeacherHead) else part


def fused_distill_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: SparseTargets | TeacherHead | None,
                       labels: torch.Tensor, *, bias: torch.Tensor | None = None, alpha: float,
                       temperature: float = 1.0, loss: str = "forward_kl", jsd_beta: float = 0.5,
                       ignore_index: int = -100, chunk_tokens: int | None = None,
                       ) -> tuple[torch.Tensor, dict[str, float]]:
    """`losses.distill_loss(F.linear(hidden, weight, bias), targets, labels, ...)` without the full logits.

    hidden [B, T, H] any float dtype (the student's final hidden states at positions 0..T-1, i.e.
    `[:, :-1]`), weight [V, H], bias [V] or None, targets [B, T, ...] (None only with alpha == 0),
    labels [B, T]; targets may be a `TeacherHead` (online: the teacher's logits are made per chunk
    too, equal to dense `from_logits` targets). Returns (scalar float32 total, {"kd": float, "ce":
    float}) like `distill_loss`; at most `chunk_tokens` rows of [*, V] logits (and their float32
    copies; student and teacher) exist at any time (None: `chunk_tokens_for(V)`, a chunk of about
    CHUNK_LOGITS logits).
    Masked rows (labels == ignore_index) are dropped before any logit is computed.
    """
    _check(hidden, weight, bias, targets, labels, alpha)
    chunk_tokens = chunk_tokens_for(weight.shape[0], chunk_tokens)
    if targets is None and alpha > 0:
        raise ValueError("fused_distill_loss: targets are None but train.alpha > 0 — give targets or alpha=0")
    mask = labels != ignore_index
    n = int(mask.sum())
    rows = hidden[mask]
    tgt = targets.select(mask) if targets is not None else _no_targets(n, rows.device)
    spec = {"alpha": float(alpha), "temperature": float(temperature), "loss": loss, "jsd_beta": jsd_beta,
            "chunk_tokens": chunk_tokens, "mm_dtype": _mm_dtype(hidden, weight)}
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias))
    if needs_grad:
        total, parts = _FusedHeadKD.apply(rows, weight, bias, tgt, labels[mask], spec)
    else:
        with torch.no_grad():
            total, parts = _FusedHeadKD.forward(_NoGradCtx(), rows, weight, bias, tgt, labels[mask], spec)
    kd, ce = parts.tolist()
    return total, {"kd": kd if alpha > 0 else 0.0, "ce": ce if alpha < 1 else 0.0}


class _NoGradCtx:
    """Stands in for autograd's ctx when nothing needs a gradient (evaluation): values only."""
    needs_input_grad = (False, False, False)

    def save_for_backward(self, *_):
        pass

    def mark_non_differentiable(self, *_):
        pass


def _no_targets(n: int, device) -> SparseTargets:
    # alpha == 0 (hard labels only): an empty support that `select` can slice like any other.
    empty = torch.zeros(n, 0, device=device)
    return SparseTargets(empty.long(), empty, None, torch.zeros(n, device=device), "sampled")


# ---------------------------------------------------------------------------------------- teacher

def _windows(bsz: int, seq_len: int, chunk_tokens: int):
    """(b0, b1, p0, p1) slices of hidden rows [b0:b1, p0:p1] whose logits form one chunk, row-major.

    Whole sequences are grouped while they fit in a chunk; a longer sequence is cut into windows
    of positions that overlap by one (a window's last position only gives its predecessor's label).
    """
    if seq_len <= chunk_tokens + 1:
        per = max(1, (chunk_tokens + 1) // seq_len)
        for b0 in range(0, bsz, per):
            yield b0, min(b0 + per, bsz), 0, seq_len
        return
    for b in range(bsz):
        for p0 in range(0, seq_len - 1, chunk_tokens):
            yield b, b + 1, p0, min(p0 + chunk_tokens + 1, seq_len)


def encode_chunked(hidden: torch.Tensor, weight: torch.Tensor, input_ids: torch.Tensor, *,
                   bias: torch.Tensor | None = None, chunk_tokens: int | None = None,
                   **encode_kwargs) -> dict[str, list[np.ndarray]]:
    """`targets.encode(F.linear(hidden, weight, bias), input_ids, **encode_kwargs)` chunk by chunk.

    hidden [B, L, H]: the teacher's final hidden states (`model_hidden`), weight [V, H]. Each chunk
    of about `chunk_tokens` positions (None: `chunk_tokens_for(V)`) gets its logits, goes through `targets.encode` and is dropped,
    so a pass's peak memory does not grow with V beyond one chunk. Returns encode's dict (one numpy
    array per sequence and column). encode_kwargs: fmt, k, samples, capture_temperature,
    vocab_size, generator, loss_mask — as for `targets.encode` (loss_mask [B, L] is cut per window).
    """
    if hidden.dim() != 3 or input_ids.shape != hidden.shape[:2]:
        raise ValueError(f"encode_chunked: expected hidden [B, L, H] and input_ids [B, L], got "
                         f"{tuple(hidden.shape)} and {tuple(input_ids.shape)}")
    chunk_tokens = chunk_tokens_for(weight.shape[0], chunk_tokens)
    bsz, seq_len, _ = hidden.shape
    if seq_len < 2:  # let encode say what is wrong, on the whole batch
        return encode(F.linear(hidden, weight, bias), input_ids, **encode_kwargs)
    pieces: list[dict] = [dict() for _ in range(bsz)]  # per sequence: column -> list of arrays
    mask = encode_kwargs.pop("loss_mask", None)
    with torch.no_grad():
        for b0, b1, p0, p1 in _windows(bsz, seq_len, chunk_tokens):
            logits = F.linear(hidden[b0:b1, p0:p1], weight, bias)
            window_mask = None if mask is None else mask[b0:b1, p0:p1]
            enc = encode(logits, input_ids[b0:b1, p0:p1], loss_mask=window_mask, **encode_kwargs)
            del logits
            for col, arrays in enc.items():
                for i, a in enumerate(arrays):
                    pieces[b0 + i].setdefault(col, []).append(a)
    # Array columns are joined chunk after chunk; a per-sequence scalar (e.g. capture_temperature)
    # is the same in every chunk of a sequence: keep one.
    return {c: [p[c][0] if np.ndim(p[c][0]) == 0 else np.concatenate(p[c]) for p in pieces]
            for c in pieces[0]}


# ---------------------------------------------------------------------------------------- models

_CHECKED: set[int] = set()
# Config attributes of models whose logits are not lm_head(hidden): they can't use the fused path.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def _unwrap(model):
    return model.module if hasattr(model, "module") else model


def fused_head_problem(model) -> str | None:
    """Why `model` (a HF causal LM, maybe DDP-wrapped) can't give hidden states + head; None if it can."""
    inner = _unwrap(model)
    weight = getattr(inner.get_output_embeddings(), "weight", None)
    if weight is None or weight.dim() != 2:
        return "has no linear LM head (get_output_embeddings())"
    for attr in _LOGIT_TRANSFORMS:
        if getattr(inner.config, attr, None) not in (None, 0, 0.0, 1, 1.0):
            return f"transforms its logits ({attr}={getattr(inner.config, attr)}): the fused head would differ"
    if "logits_to_keep" not in inspect.signature(inner.forward).parameters:
        return "has no logits_to_keep argument in forward: it would compute the full logits anyway"
    return None


def use_fused(fused_loss: bool | None, tokens: int, vocab: int, chunk_tokens: int | None = None) -> bool:
    """train.fused_loss: true / false as set; null (auto): fused when a micro-batch's `tokens` need more
    than one chunk of logits — below that the fused path holds the same logits and saves nothing."""
    if fused_loss is not None:
        return bool(fused_loss)
    return tokens > chunk_tokens_for(vocab, chunk_tokens)


def model_hidden(model, input_ids: torch.Tensor, **forward_kwargs):
    """(hidden [B, L, H], head weight [V, H], head bias [V] | None) of a HF causal LM, no full logits.

    `model` may be wrapped (DDP): the forward goes through the wrapper (gradient sync), with
    `logits_to_keep=1`, and a hook on the base model keeps its output — what the head consumes.
    On the first call per model the head re-applied to the last position is compared with the
    model's own logits; a mismatch (a model that scales or soft-caps its logits) is refused.
    """
    inner = _unwrap(model)
    name = type(inner).__name__
    problem = fused_head_problem(model)
    if problem:
        raise ValueError(f"{name} {problem} — set train.fused_loss=false for this model")
    head = inner.get_output_embeddings()
    got = {}
    hook = inner.base_model.register_forward_hook(lambda _m, _a, out: got.__setitem__("h", out[0]))
    try:
        out = model(input_ids=input_ids, logits_to_keep=1, **forward_kwargs)
    finally:
        hook.remove()
    # Read after the forward: under FSDP the root's forward swaps the sharded head for the gathered
    # one, which stays until its backward (the root is not resharded after forward) — gradients
    # into it are reduce-scattered by FSDP's end-of-backward hook like any other.
    weight = head.weight
    # A teacher spread over GPUs (device_map="auto") may end its body on another device than its head.
    hidden, bias = got["h"].to(weight.device), getattr(head, "bias", None)
    if id(inner) not in _CHECKED:
        with torch.no_grad():
            ref = out.logits[:, -1].float()
            mine = F.linear(hidden[:, -1].to(weight.dtype), weight, bias).float()
            # bf16 autocast rounds the model's own logits: compare at bf16's precision.
            if not torch.allclose(mine, ref, atol=2e-2 * (1 + ref.abs().max().item()), rtol=2e-2):
                raise ValueError(f"{name}: its LM head applied to the base model's output does not give "
                                 "the model's logits — set train.fused_loss=false for this model")
        _CHECKED.add(id(inner))
    return hidden, weight, bias


class RowLogProbs:
    """A causal LM's float32 log-probs at a batch's predicting positions, a range of rows at a time.

    Rows are the B·(L-1) positions of `input_ids` [B, L] that predict a next token (or those `keep`
    selects), row-major (row b·(L-1) + j predicts input_ids[b, j + 1]). With a plain linear head only the final hidden states
    [rows, H] are kept and `log_probs(lo, hi)` applies the head to rows [lo, hi); a model that
    transforms its logits (`fused_head_problem`) gives its full logits once and they are sliced.
    """

    def __init__(self, model, input_ids: torch.Tensor, keep: torch.Tensor | None = None, **forward_kwargs):
        """keep [B, L-1] bool: only those positions become rows (None: all). forward_kwargs: e.g.
        attention_mask."""
        def pick(x):  # [B, L-1, D] -> [rows, D]
            return x.flatten(0, 1) if keep is None else x[keep]

        self.full = fused_head_problem(model) is not None
        if self.full:
            logits = model(input_ids=input_ids, **forward_kwargs).logits[:, :-1]
            self.rows, self.weight, self.bias, self.vocab = pick(logits), None, None, logits.shape[-1]
        else:
            hidden, self.weight, self.bias = model_hidden(model, input_ids, **forward_kwargs)
            self.rows, self.vocab = pick(hidden[:, :-1]), self.weight.shape[0]

    def __len__(self) -> int:
        return self.rows.shape[0]

    def log_probs(self, lo: int, hi: int) -> torch.Tensor:
        """[hi - lo, V] float32 log-softmax of rows lo..hi-1."""
        rows = self.rows[lo:hi]
        logits = rows if self.full else F.linear(rows.to(self.weight.dtype), self.weight, self.bias)
        return torch.log_softmax(logits.float(), dim=-1)
