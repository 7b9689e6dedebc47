"""Exact changes of basis of a :class:`TaskRNN`'s hidden state.

A change ``h~ = A (h - c)`` with ``A`` invertible is absorbed into the weights: the first linear layer
of ``f`` and of ``g`` read ``h = A^-1 h~ + c``, the last layer of ``f`` writes ``A (f - c)``, and the
initial state becomes ``A (h0 - c)``. The rewritten network computes the same outputs (up to float
rounding) and is again a :class:`TaskRNN`, so every normalisation step can be checked by running it.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from ...zoo.algorithmic.rnn import TaskRNN

__all__ = ["change_basis", "linear_layers", "is_linear_recurrence", "recurrence_matrices"]


def linear_layers(seq: nn.Sequential) -> list[nn.Linear]:
    """The ``nn.Linear`` layers of ``seq`` in order."""
    return [m for m in seq if isinstance(m, nn.Linear)]


def is_linear_recurrence(rnn: TaskRNN) -> bool:
    """Whether ``f`` is one linear layer: ``h_t = W h_{t-1} + U x_t + b``."""
    return len(linear_layers(rnn.f)) == 1


def recurrence_matrices(rnn: TaskRNN) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(W, U, b)`` of a linear recurrence ``h_t = W h_{t-1} + U x_t + b`` (float64)."""
    if not is_linear_recurrence(rnn):
        raise ValueError(f"f has {len(linear_layers(rnn.f))} linear layers; a linear recurrence has exactly 1")
    layer = linear_layers(rnn.f)[0]
    n = rnn.shape.hidden_dim
    w = layer.weight.detach().double().numpy()
    return w[:, :n].copy(), w[:, n:].copy(), layer.bias.detach().double().numpy().copy()


def change_basis(rnn: TaskRNN, a: np.ndarray, c: np.ndarray | None = None) -> TaskRNN:
    """A copy of ``rnn`` (float64) whose hidden state is ``A (h - c)``; same outputs as ``rnn``."""
    n = rnn.shape.hidden_dim
    a = np.asarray(a, dtype=np.float64)
    if a.shape != (n, n):
        raise ValueError(f"the basis change must be a {n}x{n} matrix, not {a.shape}")
    c = np.zeros(n) if c is None else np.asarray(c, dtype=np.float64)
    a_inv = np.linalg.inv(a)
    new = copy.deepcopy(rnn).double()
    A, Ai, C = (torch.from_numpy(v) for v in (a, a_inv, c))
    with torch.no_grad():
        first, last = linear_layers(new.f)[0], linear_layers(new.f)[-1]
        w_h = first.weight[:, :n].clone()
        first.bias += w_h @ C
        first.weight[:, :n] = w_h @ Ai
        last.weight.copy_(A @ last.weight)
        last.bias.copy_(A @ (last.bias - C))
        g_first = linear_layers(new.g)[0]
        g_first.bias += g_first.weight @ C
        g_first.weight.copy_(g_first.weight @ Ai)
        new.h0.copy_(A @ (new.h0 - C))
    return new
