"""Tasks: one module each behind `tasks.base.Task`; `get_task(cfg)` picks the one `task:` names."""
from __future__ import annotations

from .base import Task

TASKS: dict[str, str] = {
    "causal_lm": "raydistill.tasks.causal_lm:CausalLM",
    "sequence_classification": "raydistill.tasks.sequence_classification:SequenceClassification",
}
# The soft-target formats each task's store may hold, default first: config checks `targets.format`
# against these without importing the task modules (and torch). Each Task's `formats` is its entry.
TASK_FORMATS: dict[str, tuple[str, ...]] = {
    "causal_lm": ("sampled", "topk"),
    "sequence_classification": ("dense",),
}


def get_task(cfg) -> Task:
    import importlib

    name = getattr(cfg, "task", "causal_lm") or "causal_lm"
    if name not in TASKS:
        raise ValueError(f"task: unknown task {name!r} — use one of {', '.join(sorted(TASKS))}")
    module, _, attr = TASKS[name].partition(":")
    return getattr(importlib.import_module(module), attr)(cfg)


__all__ = ["TASKS", "TASK_FORMATS", "Task", "get_task"]
