"""Counterfactual tasks: seeded pairs of inputs that differ in exactly one named factor.

    from crosspatch.tasks import get_task, tokenize_pairs
    task = get_task("ioi")
    pairs = task.pairs(32, seed=0, split="test")         # TextPair(clean, corrupt, answer, distractor, ...)
    data = tokenize_pairs(pairs, tokenizer)              # id tensors for activation_patching and the metrics

Built-in tasks: ``ioi`` (indirect object identification), ``greater-than`` (years) and ``shapes``
(procedurally drawn images with known factors). Tasks register through the ``register_tasks``
plugin hook; :func:`tasks` and :func:`get_task` read the plugin registry, so a plugin's tasks
appear here too.
"""

from __future__ import annotations

from typing import Any

from .base import Task, TaskError, TextPair, TokenizedPairs, tokenize_pairs, words
from .greater_than import GreaterThanTask, greater_than_metric
from .ioi import IOITask

__all__ = [
    "GreaterThanTask", "IOITask", "ShapesTask", "Task", "TaskError", "TextPair", "TokenizedPairs",
    "get_task", "greater_than_metric", "tasks", "tokenize_pairs", "words",
]


def tasks() -> dict[str, Any]:
    """Every registered task by name (built-in and from plugins)."""
    from ...plugins.registry import get_registry

    return get_registry().tasks()


def get_task(name: str) -> Any:
    """The registered task called ``name``; :class:`TaskError` names it and lists the others if unknown."""
    registered = tasks()
    if name not in registered:
        known = ", ".join(sorted(registered)) or "none"
        raise TaskError(
            f"no task named {name!r}; registered tasks: {known} "
            f"(plugins add tasks with the register_tasks hook; `crosspatch plugins` lists them)"
        )
    return registered[name]


def __getattr__(name: str) -> Any:
    # The image task is imported on first use: text users need not pay for it.
    if name == "ShapesTask":
        from .shapes import ShapesTask

        return ShapesTask
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
