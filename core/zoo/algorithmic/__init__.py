"""Algorithmic sequence tasks and the small recurrent networks trained on them (program extraction's data).

``rnn`` holds :class:`TaskRNN`, the network every task trains: ``h_t = f([h_{t-1}, x_t])``,
``y_t = g(h_t)`` with small MLPs ``f`` and ``g``.
"""

from .rnn import RNNShape, TaskRNN, mlp

__all__ = ["RNNShape", "TaskRNN", "mlp"]
