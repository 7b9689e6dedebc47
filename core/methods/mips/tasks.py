"""The task side of extraction: the step values a task feeds and its ground truth."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ...zoo.algorithmic.rnn import TaskRNN
from .inputs import Alphabet

__all__ = ["TaskInfo", "task_info"]


@dataclass
class TaskInfo:
    """What extraction needs of a task: its name, the step values it feeds, its ground truth."""

    name: str
    alphabet: Alphabet
    truth: Callable[[list], list[int]] | None = None


def task_info(task: Any, rnn: TaskRNN | None = None) -> TaskInfo:
    """A :class:`TaskInfo` from a task name, an algorithmic task, or one already made; ``None`` means
    binary inputs and no ground truth (then nothing can count as solved)."""
    if isinstance(task, TaskInfo):
        return task
    if task is None:
        if rnn is None:
            raise ValueError("without a task, give the network: its input width sets the binary alphabet")
        return TaskInfo("unknown", Alphabet.product((0, 1), rnn.shape.input_dim), None)
    if isinstance(task, str):
        from ...zoo.algorithmic.tasks import get_algorithmic_task

        task = get_algorithmic_task(task)
    return TaskInfo(task.name, Alphabet(task.steps), task.truth)
