"""The task interface: everything that differs between kinds of distillation work.

A *task* says how corpus rows become input rows, which Auto class loads teacher and student,
where the soft targets sit (which positions of which logits) and which positions carry loss, and
how a held-out split is evaluated. The data phase, the teacher pass, the store, the trainer and
the refresh scheduler hold a `Task` and never ask which one it is.

Shapes, for a batch of B input rows:

    inputs    dict[str, Tensor]: at least "input_ids" [B, L] int64; a task may add its own
              (e.g. "attention_mask" [B, L], "loss_mask" [B, L] bool, "label" [B] int64).
    logits    [B, P, V] float: the P target positions of each row (P = L - 1 for a causal LM:
              position j predicts input_ids[j + 1]; P = 1 for a classifier).
    labels    [B, P] int64 with -100 where a position carries no loss (prompt tokens, padding,
              a row with no label).

Adding a task: one module under `raydistill/tasks/` with a `Task` subclass, registered in
`tasks/__init__.py:TASKS` under the name `task:` takes in the config.

Who calls what (none of these callers asks which task it has):

    trainer      build_student, inputs_from_arrow, logits, labels (student and online teacher)
    teacher pass load_model, inputs_from_arrow, encode_targets
    evaluation   load_model, build_student, evaluate
    data phase   map_batches_fn (corpus rows -> input rows), input_schema
    preflight    preflight (task-specific checks before Ray starts)

Changes since the first draft: `encode_targets` (the teacher pass's store columns: a causal LM's
encoder takes whole-sequence logits and aligns them itself, a classifier stores one dense row).
Methods run with no grad/autocast context of their own: the caller sets those.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pyarrow as pa

if TYPE_CHECKING:  # config imports this package: no torch import just to check `task:`
    import torch


class Task:
    """One kind of distillation work. Subclasses set `name`, `formats` and implement the methods."""

    name: ClassVar[str]
    formats: ClassVar[tuple[str, ...]]       # soft-target formats the store may hold for this task
    default_format: ClassVar[str]

    def __init__(self, cfg):
        self.cfg = cfg

    # ---- models
    def load_model(self, name_or_path: str, **kwargs):
        """A teacher or trained student (safe loading: see `models`)."""
        raise NotImplementedError

    def build_student(self, *, seed: int):
        """The student at init (from `student.model` or `student.init_from_teacher`)."""
        raise NotImplementedError

    # ---- data: corpus rows -> input rows (Ray Data map_batches function + its kwargs)
    def map_batches_fn(self, tokenizer_path: str, eos_id: int) -> tuple:
        """(fn, fn_kwargs, corpus columns with the text column first): `fn(batch, **fn_kwargs)` maps a
        batch {column: values} of corpus rows to {"input_ids" [n, L], "valid" [n], "docs" [n],
        "skipped" [n]} (+ "labels" [n, P] when input rows carry labels), as data.tokenize_and_pack."""
        raise NotImplementedError

    def preflight(self) -> list[str]:
        """Problems of the config with its data and models found before Ray starts (`key: what — fix`)."""
        return []

    def input_schema(self, vocab_size: int) -> pa.Schema:
        """Columns of an input shard (seq_id first)."""
        raise NotImplementedError

    def inputs_from_arrow(self, batch: pa.Table | pa.RecordBatch) -> dict[str, torch.Tensor]:
        """Input rows (as stored) -> model inputs (see shapes above)."""
        raise NotImplementedError

    # ---- positions
    def logits(self, model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """[B, P, V] logits at the target positions (teacher and student alike)."""
        raise NotImplementedError

    def labels(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """[B, P] hard labels, -100 where no loss."""
        raise NotImplementedError

    def hidden_states(self, model, inputs: dict[str, torch.Tensor]):
        """(final hidden states [B, P, H] at the target positions, head weight [V, H], bias [V] | None)
        for the fused head + loss (`raydistill.chunked_loss`); None: this task's logits are small."""
        return None

    def encode_targets(self, model, inputs: dict[str, torch.Tensor], *, params: dict, vocab_size: int,
                       generator) -> dict[str, list[np.ndarray]]:
        """Teacher pass: the soft-target columns of a batch ({column: one array per row}, as
        `targets.encode` returns them) for `targets.build_table`. `params` = teacher.target_params."""
        raise NotImplementedError

    # ---- evaluation
    def evaluate(self, student, teacher, eval_table: pa.Table, *, batch_size: int, max_rows: int,
                 vocab_width: int | None = None) -> dict:
        """Held-out metrics of `student` against `teacher` (either may be None), on at most
        `max_rows` rows of the eval file: {"student": {...}, "teacher": {...}, "eval_sequences": n}
        plus any task-level figures (e.g. "tokens"); a part is left out when its model is None.
        vocab_width: the run's shared head width W (models.ModelInfo; None: unknown) — a causal LM's
        teacher is compared over its first W logits."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"task": self.name}


def int_matrix(column, width: int | None = None) -> np.ndarray:
    """A column of equal-length int lists -> a 2-D int64 array without a Python loop."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    flat = arr.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
    width = width or (len(flat) // max(len(arr), 1))
    return flat.reshape(len(arr), width)
