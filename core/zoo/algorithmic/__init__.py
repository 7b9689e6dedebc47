"""Algorithmic sequence tasks and the small recurrent networks trained on them (program extraction's data).

``rnn`` holds :class:`TaskRNN`, the network every task trains: ``h_t = f([h_{t-1}, x_t])``,
``y_t = g(h_t)`` with small MLPs ``f`` and ``g``. ``task`` and ``tasks`` hold the task family (MIPS's
benchmark tasks and a few more), each with a seeded generator and a plain-Python ground truth:

    from crosspatch.zoo.algorithmic import get_algorithmic_task
    task = get_algorithmic_task("parity-last3")
    x, y = task.sample(512, length=10, seed=0)    # x [512, 10, 1] float, y [512, 10] long
    task.truth([1, 0, 1, 1])                      # [1, 1, 0, 0]

``search`` finds the smallest network that solves a task (MIPS's grow-then-bisect, then L1);
``checkpoint`` saves and loads one; ``plugin`` registers ``rnn-<task>`` zoo entries built by the search:

    from crosspatch import zoo
    model = zoo.load("rnn-parity-last2").model     # a TaskRNN at 100 % on held-out lengths 1..12
"""

from .checkpoint import load_task_rnn, save_task_rnn
from .rnn import RNNShape, TaskRNN, mlp
from .search import SearchConfig, SearchResult, search_rnn
from .task import AlgorithmicTask, AlgorithmicTaskError
from .tasks import ALGORITHMIC_TASKS, algorithmic_tasks, get_algorithmic_task

__all__ = [
    "ALGORITHMIC_TASKS", "AlgorithmicTask", "AlgorithmicTaskError", "RNNShape", "SearchConfig", "SearchResult",
    "TaskRNN", "algorithmic_tasks", "get_algorithmic_task", "load_task_rnn", "mlp", "save_task_rnn", "search_rnn",
]
