"""Input sequences for extraction and verification, and the network's answers on them.

A sequence is a list of steps; a step is a tuple of ``input_dim`` integers (the task's symbols, fed to
the network as floats). ``alphabet`` is every step value the task can feed.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from ...zoo.algorithmic.rnn import TaskRNN
from ...zoo.algorithmic.task import every_sequence

__all__ = ["Alphabet", "all_sequences", "random_sequences", "run_hidden", "run_predict"]


@dataclass(frozen=True)
class Alphabet:
    """The values one step can take: ``steps[i]`` is a tuple of ``input_dim`` integers."""

    steps: tuple[tuple[int, ...], ...]

    @property
    def input_dim(self) -> int:
        return len(self.steps[0])

    def __len__(self) -> int:
        return len(self.steps)

    @classmethod
    def product(cls, symbols: list[int] | tuple[int, ...], input_dim: int) -> "Alphabet":
        """Every combination of ``symbols`` over ``input_dim`` inputs."""
        return cls(tuple(itertools.product(tuple(int(s) for s in symbols), repeat=input_dim)))


def all_sequences(alphabet: Alphabet, length: int) -> np.ndarray:
    """Every sequence of ``length`` steps: ``[len(alphabet)**length, length, input_dim]`` integers
    (:func:`~crosspatch.zoo.algorithmic.task.every_sequence` over the alphabet's steps)."""
    return every_sequence(alphabet.steps, length)


def random_sequences(alphabet: Alphabet, n: int, length: int, seed: int) -> np.ndarray:
    """``n`` sequences of ``length`` steps drawn uniformly (seeded): ``[n, length, input_dim]``."""
    rng = np.random.default_rng(seed)
    steps = np.asarray(alphabet.steps, dtype=np.int64)
    return steps[rng.integers(0, len(alphabet), size=(n, length))]


def _batches(x: np.ndarray, size: int):
    for i in range(0, len(x), size):
        yield x[i : i + size]


@torch.no_grad()
def run_hidden(rnn: TaskRNN, seqs: np.ndarray, batch: int = 8192) -> np.ndarray:
    """Hidden states ``h_1 … h_T`` for ``seqs [N, T, d]``: ``[N, T, hidden_dim]`` (float64)."""
    dtype = next(rnn.parameters()).dtype
    out = [rnn.hidden_states(torch.as_tensor(b, dtype=dtype)).double().numpy() for b in _batches(seqs, batch)]
    return np.concatenate(out) if out else np.zeros((0, seqs.shape[1], rnn.shape.hidden_dim))


@torch.no_grad()
def run_predict(rnn: TaskRNN, seqs: np.ndarray, batch: int = 8192) -> np.ndarray:
    """The network's per-step integer predictions for ``seqs [N, T, d]``: ``[N, T]``."""
    dtype = next(rnn.parameters()).dtype
    out = [rnn.predict(torch.as_tensor(b, dtype=dtype)).numpy() for b in _batches(seqs, batch)]
    return np.concatenate(out) if out else np.zeros((0, seqs.shape[1]), np.int64)
