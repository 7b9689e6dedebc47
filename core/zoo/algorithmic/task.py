"""One algorithmic sequence task: integer input streams, one integer output per step, and its oracle.

A task maps a sequence of steps ``x_1 … x_T`` (each step one integer per input stream) to one integer
``y_t`` per step. It carries two independent implementations of the same rule:

- ``rule``: a plain-Python program run step by step (:meth:`AlgorithmicTask.truth`), the oracle that
  program extraction verifies an emitted program against;
- ``labels``: a vectorised NumPy version over a whole batch, which the seeded generator
  (:meth:`AlgorithmicTask.sample`) uses, so training data is fast to make. The tests check that the
  two agree on every task (exhaustively at short lengths).

Symbols of stream ``i`` are the integers ``low[i] … low[i] + alphabet[i] - 1``; they reach the network
as real numbers (not one-hot), as in MIPS. Values before the first step count as 0 (MIPS's convention
for ``Prev1``, ``Diff_Last2``, ``Alternating_Last3`` …). Outputs are ``"classes"`` (``0 … n_classes-1``,
trained with cross-entropy) or ``"value"`` (any integer, trained as a regression and rounded).
"""

from __future__ import annotations

import itertools
import math
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .rnn import RNNShape

__all__ = ["AlgorithmicTask", "AlgorithmicTaskError", "Step", "every_sequence"]

Step = tuple[int, ...]
_SPLITS = {"train": 0, "test": 1}


class AlgorithmicTaskError(ValueError):
    """An unknown algorithmic task, or a request a task cannot serve (bad split, length, symbol)."""


@dataclass(frozen=True)
class AlgorithmicTask:
    """A seeded sequence-to-sequence task with per-step integer outputs and a Python ground truth.

    ``rule(steps)`` gets the steps as tuples of ints and returns one int per step; ``labels(x)`` gets
    ``x [n, T, input_dim]`` (int64) and returns ``y [n, T]``. ``sampler(rng, n, T)``, if given, draws
    the inputs instead of the uniform draw (for tasks whose positives are rare under it).
    ``mips_name`` is the task's name in the MIPS benchmark (Michaud et al. 2024), ``None`` if ours.
    """

    name: str
    description: str
    alphabet: tuple[int, ...]
    rule: Callable[[list[Step]], list[int]] = field(repr=False)
    labels: Callable[[np.ndarray], np.ndarray] = field(repr=False)
    output_kind: str = "classes"
    n_classes: int | None = 2
    low: tuple[int, ...] | None = None
    mips_name: str | None = None
    sampler: Callable[[np.random.Generator, int, int], np.ndarray] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.output_kind not in ("classes", "value"):
            raise AlgorithmicTaskError(f"task {self.name!r}: output_kind must be 'classes' or 'value', "
                                       f"not {self.output_kind!r}")
        if self.output_kind == "classes" and (self.n_classes is None or self.n_classes < 2):
            raise AlgorithmicTaskError(f"task {self.name!r}: a 'classes' task needs n_classes >= 2, "
                                       f"not {self.n_classes!r}")
        if self.output_kind == "value" and self.n_classes is not None:
            raise AlgorithmicTaskError(f"task {self.name!r}: a 'value' task has n_classes=None, "
                                       f"not {self.n_classes!r}")
        if self.low is None:
            object.__setattr__(self, "low", (0,) * len(self.alphabet))
        if len(self.low) != len(self.alphabet):
            raise AlgorithmicTaskError(f"task {self.name!r}: low has {len(self.low)} entries, alphabet "
                                       f"{len(self.alphabet)}")

    # ------------------------------------------------------------------ sizes

    @property
    def input_dim(self) -> int:
        """Number of input streams (the network's input width)."""
        return len(self.alphabet)

    @property
    def output_dim(self) -> int:
        """The network's output width: ``n_classes`` logits, or 1 value."""
        return int(self.n_classes) if self.output_kind == "classes" else 1

    def symbols(self, stream: int = 0) -> range:
        """The integers stream ``stream`` carries."""
        lo = self.low[stream]
        return range(lo, lo + self.alphabet[stream])

    @property
    def steps(self) -> tuple[Step, ...]:
        """Every value one step can take, in order: the streams' symbols combined, the last stream fastest."""
        return tuple(itertools.product(*(self.symbols(i) for i in range(self.input_dim))))

    def rnn_shape(self, hidden_dim: int, f_hidden: Sequence[int] = (), g_hidden: Sequence[int] = ()) -> RNNShape:
        """The :class:`RNNShape` of a network for this task with the given widths."""
        return RNNShape(self.input_dim, int(hidden_dim), self.output_dim, tuple(f_hidden), tuple(g_hidden),
                        self.output_kind)

    # ------------------------------------------------------------------ ground truth

    def truth(self, sequence: Sequence[Any]) -> list[int]:
        """The outputs at every step of ``sequence`` by the Python rule.

        A step is an int (one stream) or a tuple of ints (one per stream); a ``[T, input_dim]`` array
        or tensor works too.
        """
        steps = [self._step(s) for s in sequence]
        return [int(v) for v in self.rule(steps)]

    def _step(self, s: Any) -> Step:
        if isinstance(s, (int, np.integer)):
            step: Step = (int(s),)
        elif isinstance(s, torch.Tensor):
            step = tuple(int(round(float(v))) for v in s.reshape(-1).tolist())
        else:
            step = tuple(int(round(float(v))) for v in np.asarray(s).reshape(-1).tolist())
        if len(step) != self.input_dim:
            raise AlgorithmicTaskError(f"task {self.name!r} has {self.input_dim} input stream(s); a step "
                                       f"has {len(step)} value(s): {s!r}")
        for i, v in enumerate(step):
            if v not in self.symbols(i):
                r = self.symbols(i)
                raise AlgorithmicTaskError(f"task {self.name!r}: stream {i} takes {r.start}..{r.stop - 1}, "
                                           f"not {v}")
        return step

    def label(self, x: np.ndarray | torch.Tensor) -> np.ndarray:
        """The vectorised outputs ``[n, T]`` (int64) of integer inputs ``x [n, T, input_dim]``."""
        arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
        arr = np.rint(arr).astype(np.int64)
        if arr.ndim != 3 or arr.shape[2] != self.input_dim:
            raise AlgorithmicTaskError(f"task {self.name!r}: inputs must be [n, T, {self.input_dim}], "
                                       f"got {list(arr.shape)}")
        return np.array(self.labels(arr), dtype=np.int64).reshape(arr.shape[:2])

    # ------------------------------------------------------------------ data

    def sample(self, n: int, length: int, seed: int = 0, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` random sequences of ``length`` steps: ``(x [n, T, input_dim] float32, y [n, T] long)``.

        The same ``(seed, split, length)`` gives the same data; ``split`` ("train" or "test") draws
        from a separate stream.
        """
        if split not in _SPLITS:
            raise AlgorithmicTaskError(f"split must be one of {sorted(_SPLITS)}, not {split!r}")
        if length < 1 or n < 0:
            raise AlgorithmicTaskError(f"task {self.name!r}: need n >= 0 and length >= 1, got n={n}, "
                                       f"length={length}")
        rng = np.random.default_rng([int(seed), _SPLITS[split], int(length), _name_key(self.name)])
        if self.sampler is not None:
            x = np.asarray(self.sampler(rng, n, length), dtype=np.int64).reshape(n, length, self.input_dim)
        else:
            x = np.stack([rng.integers(lo, lo + a, size=(n, length)) for lo, a in zip(self.low, self.alphabet)],
                         axis=-1)
        y = self.label(x)
        return torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y)

    def n_sequences(self, length: int) -> int:
        """How many distinct input sequences of ``length`` steps exist."""
        return math.prod(self.alphabet) ** int(length)

    def all_sequences(self, length: int, limit: int = 1 << 20) -> tuple[torch.Tensor, torch.Tensor]:
        """Every input sequence of ``length`` steps with its outputs (for exhaustive checks).

        Refuses when there are more than ``limit`` of them (sample instead).
        """
        count = self.n_sequences(length)
        if count > limit:
            raise AlgorithmicTaskError(f"task {self.name!r} has {count} sequences of length {length}, more "
                                       f"than limit={limit}; use sample()")
        x = every_sequence(self.steps, length)
        return torch.from_numpy(x.astype(np.float32)), torch.from_numpy(self.label(x))

    def accuracy(self, predictions: torch.Tensor, y: torch.Tensor) -> float:
        """Share of steps where ``predictions [n, T]`` equal ``y``."""
        return float((predictions.long() == y.long()).float().mean()) if y.numel() else 1.0

    def sequence_accuracy(self, predictions: torch.Tensor, y: torch.Tensor) -> float:
        """Share of sequences whose every step is right."""
        if not y.numel():
            return 1.0
        return float((predictions.long() == y.long()).all(dim=1).float().mean())


def every_sequence(steps: Sequence[Sequence[int]], length: int) -> np.ndarray:
    """Every sequence of ``length`` steps drawn from ``steps`` (each a tuple of ``input_dim`` integers), in
    order with the last step fastest: ``[len(steps) ** length, length, input_dim]`` int64."""
    values = np.asarray(steps, dtype=np.int64).reshape(len(steps), -1)
    if not length:
        return np.zeros((1, 0, values.shape[1]), dtype=np.int64)
    idx = np.indices((len(steps),) * length).reshape(length, -1).T
    return values[idx]


def _name_key(name: str) -> int:
    """A stable integer of the task name (Python's ``hash`` of a str changes between runs)."""
    return zlib.crc32(name.encode("utf-8"))
