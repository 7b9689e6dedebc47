"""Algorithmic sequence tasks and the small recurrent networks trained on them (program extraction's data).

``rnn`` holds :class:`TaskRNN`, the network every task trains: ``h_t = f([h_{t-1}, x_t])``,
``y_t = g(h_t)`` with small MLPs ``f`` and ``g``. ``task`` and ``tasks`` hold the task family (MIPS's
benchmark tasks and a few more), each with a seeded generator and a plain-Python ground truth:

    from crosspatch.zoo.algorithmic import get_algorithmic_task
    task = get_algorithmic_task("parity-last3")
    x, y = task.sample(512, length=10, seed=0)    # x [512, 10, 1] float, y [512, 10] long
    task.truth([1, 0, 1, 1])                      # [1, 1, 0, 0]
"""

from .rnn import RNNShape, TaskRNN, mlp
from .task import AlgorithmicTask, AlgorithmicTaskError
from .tasks import ALGORITHMIC_TASKS, algorithmic_tasks, get_algorithmic_task

__all__ = [
    "ALGORITHMIC_TASKS", "AlgorithmicTask", "AlgorithmicTaskError", "RNNShape", "TaskRNN", "algorithmic_tasks",
    "get_algorithmic_task", "mlp",
]
