"""Tasks: one module each behind `tasks.base.Task`; `get_task(cfg)` picks the one `task:` names."""
from __future__ import annotations

from .base import Task

TASKS: dict[str, str] = {
    "causal_lm": "raydistill.tasks.causal_lm:CausalLM",
}


def get_task(cfg) -> Task:
    import importlib

    name = getattr(cfg, "task", "causal_lm") or "causal_lm"
    if name not in TASKS:
        raise ValueError(f"task: unknown task {name!r} — use one of {', '.join(sorted(TASKS))}")
    module, _, attr = TASKS[name].partition(":")
    return getattr(importlib.import_module(module), attr)(cfg)


__all__ = ["TASKS", "Task", "get_task"]
