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
"""
from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
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

    # ---- evaluation
    def evaluate(self, student, teacher, eval_table: pa.Table, *, batch_size: int, max_rows: int) -> dict:
        """Held-out metrics of `student` against `teacher` (either may be None)."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"task": self.name}


def int_matrix(column, width: int | None = None) -> np.ndarray:
    """A column of equal-length int lists -> a 2-D int64 array without a Python loop."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    flat = arr.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
    width = width or (len(flat) // max(len(arr), 1))
    return flat.reshape(len(arr), width)
