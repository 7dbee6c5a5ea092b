"""Held-out evaluation: the run's students against their teacher (`evaluate_students`, any task),
and the causal-LM figures (`evaluate`) that the `causal_lm` task reports.

Positions follow the package convention: a sequence of `L` tokens has `T = L - 1` predicted
positions, position `j` predicts `input_ids[j + 1]`, and the logits used are `logits[:, :-1, :]`.

Figures (all token-weighted means over every position of every sequence — of a store of examples,
over its loss positions only: `loss_mask` — in nats):

- `ce`: cross-entropy of the model against the actual next token; `perplexity = exp(ce)`;
- `kl_teacher_student`: KL(p_teacher ‖ q_student) over the full vocabulary (forward KD's target);
- `top1_agreement`: share of positions where the student's argmax equals the teacher's.

Widths (models.ModelInfo): the teacher is the distribution the student learned from, softmax over
its first W logits (W = the run's shared head width, recorded in the store's manifest as
tokenizer.width; by default the narrower head of the two models); the student's softmax is over
its whole head, so KL counts the teacher's ids < W against the student's log-probs there (its mass
on padding rows is lost to it), and its argmax may fall on a padding row (no agreement).

The eval inputs live in a Parquet file with an `input_ids` list column (uint16 / uint32, one
packed sequence of length `L` per row): `eval_input_ids` turns such a table into a tensor.
"""
from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.nn.functional as F

from .chunked_loss import RowLogProbs

__all__ = ["evaluate", "eval_input_ids", "evaluate_students", "submit_evaluation"]


def evaluate_students(cfg, store, student_dirs: dict, max_rows: int = 512) -> dict:
    """Held-out metrics of each exported student (and of the same student before training,
    `student_init`) against the teacher, in a Ray task placed like a teacher replica.

    student_dirs: {label: save_pretrained dir}. Returns {label: metrics, "teacher": metrics,
    "eval_sequences": n, ...} with the task's figures (causal LM: CE, KL(teacher‖student), top-1
    agreement, perplexity, "tokens")."""
    import ray

    manifest = store.manifest()
    if manifest["inputs"]["info"].get("eval_rows", 0) == 0:
        return {"note": "no held-out sequences (data.eval_fraction is 0 or the corpus is tiny)"}
    return ray.get(submit_evaluation(cfg, store.uri, manifest["inputs"]["eval"], student_dirs, max_rows))


def submit_evaluation(cfg, store_uri: str, eval_file: str, student_dirs: dict, max_rows: int = 512):
    """The ObjectRef of `evaluate_students`'s figures on one held-out input file of the store (its
    path in the manifest), against `cfg.teacher`, in a task placed like that teacher's replicas."""
    import ray

    from .cluster import teacher_options

    task = ray.remote(_evaluate_task).options(**teacher_options(cfg.teacher))
    return task.remote(cfg.to_dict(), student_dirs, (store_uri, eval_file), max_rows)


def _evaluate_task(cfg_dict: dict, student_dirs: dict, eval_uri: tuple, max_rows: int) -> dict:
    import os

    from .config import Config
    from .store import SoftTargetStore
    from .tasks import get_task

    cfg = Config.from_dict(cfg_dict, check_paths=False)
    task, t = get_task(cfg), cfg.teacher
    store = SoftTargetStore(eval_uri[0])
    table = store.read_input_file(eval_uri[1])  # checksum-verified
    width = store.manifest()["tokenizer"].get("width")  # W of the run (None: a store written before widths)
    teacher = task.load_model(os.path.expanduser(t.model), dtype=t.dtype, trust_remote_code=t.trust_remote_code,
                              allow_pickle_weights=t.allow_pickle_weights, revision=t.revision)
    # The same student before training: the baseline that shows what distillation moved.
    models = {"student_init": task.build_student(seed=cfg.run.seed)}
    models.update({label: task.load_model(path, key=label) for label, path in student_dirs.items()})
    out: dict = {}
    for label, model in models.items():
        res = task.evaluate(model, teacher, table, batch_size=t.batch_size, max_rows=max_rows, vocab_width=width)
        out[label] = res.pop("student")
        out.update(res)  # teacher, eval_sequences, task-level figures: the same for every student
    return out


def eval_input_ids(table: pa.Table, max_rows: int | None = None) -> torch.LongTensor:
    """The `input_ids` list column of `table` as a `[N, L]` int64 tensor (first `max_rows` rows).

    Every row must be a non-null list of the same length `L`; raises `ValueError` otherwise.
    """
    if "input_ids" not in table.column_names:
        raise ValueError(f"eval table has no 'input_ids' column (columns: {table.column_names}) — "
                         "pass the eval file written by the data phase")
    col = table.column("input_ids")
    if max_rows is not None:
        col = col.slice(0, max(0, int(max_rows)))
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    n = len(arr)
    if n == 0:
        return torch.empty((0, 0), dtype=torch.long)
    if arr.null_count:
        raise ValueError(f"eval 'input_ids' has {arr.null_count} null row(s) — rewrite the eval file")
    lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
    seq_len = int(lengths[0])
    if not (lengths == seq_len).all():
        raise ValueError(f"eval 'input_ids' rows have different lengths ({int(lengths.min())}.."
                         f"{int(lengths.max())}); packed sequences of one length are expected")
    # flatten() honours slice offsets, so a sliced column yields exactly its own values.
    values = arr.flatten().to_numpy(zero_copy_only=False)
    ids = np.asarray(values, dtype=np.int64).reshape(n, seq_len)
    return torch.from_numpy(ids)


def _perplexity(ce: float) -> float:
    return math.exp(ce) if ce < 700 else float("inf")


def _chunk_sums(s_rows, t_rows, labels: torch.Tensor, chunk_tokens: int | None, width: int | None = None) -> dict:
    """The figures' float64 sums over one batch's rows (`chunked_loss.RowLogProbs` of the student and
    the teacher, either None; labels [rows]), a chunk of rows at a time: at most one chunk of
    [rows, V] float32 log-probs per model exists, never [B, T, V]. The teacher is renormalised over
    its first `width` ids (None: the narrower head of the two; module docstring, Widths)."""
    from .chunked_loss import chunk_tokens_for

    heads = [r.vocab for r in (s_rows, t_rows) if r is not None]
    width = min(heads + ([int(width)] if width else [])) if heads else None
    sums = {"s_ce": 0.0, "t_ce": 0.0, "kl": 0.0, "agree": 0.0}
    if s_rows is None and t_rows is None:
        return sums
    size = chunk_tokens_for(max(heads), chunk_tokens)
    for lo in range(0, labels.numel(), size):
        hi, lab = min(lo + size, labels.numel()), labels[lo:lo + size, None]
        s_lp = s_rows.log_probs(lo, hi) if s_rows is not None else None
        t_lp = t_rows.log_probs(lo, hi) if t_rows is not None else None
        if t_lp is not None and t_lp.shape[-1] > width:  # = log_softmax(teacher logits[..., :width])
            t_lp = t_lp[..., :width] - torch.logsumexp(t_lp[..., :width], dim=-1, keepdim=True)
        if s_lp is not None:
            sums["s_ce"] += -s_lp.gather(-1, lab).double().sum().item()
        if t_lp is not None:
            sums["t_ce"] += -t_lp.gather(-1, lab).double().sum().item()
        if s_lp is not None and t_lp is not None:
            # KL(p_t ‖ q_s) = Σ_{i < width} p_t (log p_t − log q_s): p_t is 0 beyond; 0·log 0 terms are 0.
            sums["kl"] += F.kl_div(s_lp[..., :width], t_lp, log_target=True,
                                   reduction="none").sum(-1).double().sum().item()
            sums["agree"] += (s_lp.argmax(-1) == t_lp.argmax(-1)).sum().item()
    return sums


def evaluate(student, teacher, input_ids: torch.LongTensor, *, batch_size: int = 8,
             device: str | torch.device = "cpu", loss_mask: torch.Tensor | None = None,
             attention_mask: torch.Tensor | None = None, chunk_tokens: int | None = None,
             vocab_width: int | None = None) -> dict:
    """Evaluate `student` and `teacher` (loaded HF causal LMs; either may be None) on `input_ids`.

    input_ids: `[N, L]` int64, `L >= 2`. Models are moved to `device` and put in eval mode
    for the call (their previous train/eval mode is restored afterwards). loss_mask `[N, L]`
    (examples): only the positions j with loss_mask[:, j + 1] count, and "tokens" counts them;
    attention_mask `[N, L]` goes to the models (right padding). The figures are summed `chunk_tokens`
    positions at a time (None: about 2^23 logits per chunk, `chunked_loss.chunk_tokens_for`), so eval
    memory does not grow with batch_size × L × V. vocab_width: W, the run's shared head width
    (module docstring, Widths; None: the narrower head of the two models).

    Returns (a part is left out when its model is None; KL and agreement need both models):

        {"student": {"ce", "kl_teacher_student", "top1_agreement", "perplexity"},
         "teacher": {"ce", "perplexity"},
         "tokens": N * (L - 1)}
    """
    if input_ids.dim() != 2 or input_ids.shape[0] == 0 or input_ids.shape[1] < 2:
        raise ValueError(f"input_ids must be [N, L] with N >= 1 and L >= 2, got {tuple(input_ids.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    input_ids = input_ids.long()
    models = {"student": student, "teacher": teacher}
    was_training = {k: m.training for k, m in models.items() if m is not None}
    for m in models.values():
        if m is not None:
            m.to(device).eval()

    # Sums in float64 so the token-weighted means do not depend on the batching.
    sums = {"s_ce": 0.0, "t_ce": 0.0, "kl": 0.0, "agree": 0.0}
    tokens = 0
    try:
        with torch.inference_mode():
            for start in range(0, input_ids.shape[0], batch_size):
                batch = input_ids[start:start + batch_size].to(device)
                am = None if attention_mask is None else attention_mask[start:start + batch_size].to(device)
                keep = None if loss_mask is None else loss_mask[start:start + batch_size, 1:].to(device) != 0

                def pick(x):  # [B, T, ...] -> [n, ...]: the positions that count (a view when all do)
                    return x.flatten(0, 1) if keep is None else x[keep]

                labels = pick(batch[:, 1:])
                tokens += labels.numel()
                kw = {} if am is None else {"attention_mask": am}
                rows = [None if m is None else RowLogProbs(m, batch, keep, **kw) for m in (student, teacher)]
                for k, v in _chunk_sums(*rows, labels, chunk_tokens, vocab_width).items():
                    sums[k] += v
    finally:
        for k, m in models.items():
            if m is not None:
                m.train(was_training[k])

    out: dict = {}
    if student is not None:
        ce = sums["s_ce"] / tokens
        out["student"] = {"ce": ce}
        if teacher is not None:
            out["student"]["kl_teacher_student"] = sums["kl"] / tokens
            out["student"]["top1_agreement"] = sums["agree"] / tokens
        out["student"]["perplexity"] = _perplexity(ce)
    if teacher is not None:
        ce = sums["t_ce"] / tokens
        out["teacher"] = {"ce": ce, "perplexity": _perplexity(ce)}
    out["tokens"] = tokens
    return out
