"""Normalising a :class:`TaskRNN`'s hidden state, as MIPS does before looking for structure.

Each step is an exact change of basis (:func:`.basis.change_basis`), so the normalised network gives
the same outputs as the trained one:

* **whitening**: centre the hidden states seen on sample inputs and scale their covariance to the
  identity (directions the states never move along keep their scale: they carry nothing);
* **Jordan normal form** (linear ``f`` only): diagonalise the transition matrix ``W`` (real 2x2 blocks
  for complex eigenvalue pairs); skipped when ``W`` is defective or its eigenvectors ill-conditioned;
* **Toeplitz detection** (linear ``f``): whether the normalised ``W`` has constant diagonals (a shift
  register or a scaled identity), recorded for the report;
* **de-biasing**: move the origin to the fixed point of ``h -> W h + b`` when ``I - W`` is invertible,
  otherwise to the initial state ``h0`` (a counter's zero).

:func:`quantise` then snaps weights to integers or simple rationals, keeping each snap only while the
network's predictions are unchanged on the check inputs. That step is not a change of basis: the
quantised network is a different network, equal on what was checked, and used only if it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ...zoo.algorithmic.rnn import TaskRNN
from .basis import change_basis, is_linear_recurrence, linear_layers, recurrence_matrices
from .inputs import run_hidden, run_predict

__all__ = ["Normalised", "normalise", "quantise", "is_toeplitz", "Quantised"]


@dataclass
class Normalised:
    """The normalised network, the affine map ``h~ = A (h - c)`` from the original hidden state, and
    what each step did."""

    rnn: TaskRNN
    a: np.ndarray
    c: np.ndarray
    steps: list[str] = field(default_factory=list)
    toeplitz: bool = False

    def apply(self, a: np.ndarray, c: np.ndarray, note: str) -> None:
        """Compose one more change ``h' = a (h~ - c)`` onto this normalisation."""
        self.rnn = change_basis(self.rnn, a, c)
        self.c = self.c + np.linalg.solve(self.a, c)
        self.a = a @ self.a
        self.steps.append(note)


def is_toeplitz(w: np.ndarray, tol: float = 1e-3) -> bool:
    """Whether every diagonal of ``w`` is constant within ``tol`` (relative to ``max |w|``)."""
    n = w.shape[0]
    scale = max(float(np.abs(w).max()), 1e-12)
    return all(np.ptp(np.diagonal(w, k)) <= tol * scale for k in range(-n + 1, n))


def _whiten(states: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = states.mean(0)
    cov = np.cov(states - mean, rowvar=False).reshape(states.shape[1], states.shape[1])
    vals, vecs = np.linalg.eigh(cov)
    live = vals > 1e-10 * max(float(vals.max()), 1e-300)
    scale = np.where(live, 1.0 / np.sqrt(np.where(live, vals, 1.0)), 1.0)
    order = np.argsort(-vals)  # largest variance first
    return (scale[:, None] * vecs.T)[order], mean


def _real_jordan(w: np.ndarray, max_cond: float = 1e6) -> np.ndarray | None:
    """``P^-1`` such that ``P^-1 W P`` is (real block-)diagonal, or ``None`` when not well-conditioned."""
    vals, vecs = np.linalg.eig(w)
    cols, done = [], set()
    for i, lam in enumerate(vals):
        if i in done:
            continue
        v = vecs[:, i]
        if abs(lam.imag) < 1e-9:
            cols.append(np.real(v) / max(np.abs(np.real(v)).max(), 1e-300))
            done.add(i)
            continue
        j = min((k for k in range(len(vals)) if k not in done and k != i), key=lambda k: abs(vals[k] - np.conj(lam)))
        cols += [np.real(v), np.imag(v)]
        done |= {i, j}
    p = np.stack(cols, axis=1)
    if np.linalg.cond(p) > max_cond:
        return None
    return np.linalg.inv(p)


def normalise(rnn: TaskRNN, seqs: np.ndarray) -> Normalised:
    """Whiten, put the linear part in Jordan form, de-bias; hidden states from ``seqs [N, T, d]``."""
    n = rnn.shape.hidden_dim
    out = Normalised(change_basis(rnn, np.eye(n)), np.eye(n), np.zeros(n))
    states = run_hidden(out.rnn, seqs).reshape(-1, n)
    a, c = _whiten(states)
    out.apply(a, c, "whitened (centred, covariance scaled to the identity)")
    if is_linear_recurrence(out.rnn):
        w, _, _ = recurrence_matrices(out.rnn)
        p_inv = _real_jordan(w)
        if p_inv is None:
            out.steps.append("Jordan form skipped: the transition matrix is defective or ill-conditioned")
        else:
            out.apply(p_inv, np.zeros(n), "transition matrix in real Jordan form")
        w, _, b = recurrence_matrices(out.rnn)
        out.toeplitz = is_toeplitz(w)
        if out.toeplitz:
            out.steps.append("transition matrix is Toeplitz (constant diagonals)")
        if np.abs(1 - np.linalg.eigvals(w)).min() > 0.05:  # no eigenvalue near 1: a fixed point worth centring on
            fixed = np.linalg.solve(np.eye(n) - w, b)
            out.apply(np.eye(n), fixed, "de-biased: origin at the fixed point of the transition")
            return out
    h0 = out.rnn.h0.detach().numpy().copy()
    out.apply(np.eye(n), h0, "de-biased: origin at the initial state")
    return out


@dataclass
class Quantised:
    """A network with weights snapped to simple values, and how many of them were."""

    rnn: TaskRNN
    snapped: int
    total: int


def _params(rnn: TaskRNN) -> list[torch.Tensor]:
    layers = linear_layers(rnn.f) + linear_layers(rnn.g)
    return [p for m in layers for p in (m.weight, m.bias)] + [rnn.h0]


@torch.no_grad()
def quantise(rnn: TaskRNN, seqs: np.ndarray, denominators: tuple[int, ...] = (1, 2, 3, 4)) -> Quantised:
    """Snap weights to ``k / q`` (``q`` in ``denominators``, smallest first), nearest first, keeping
    the largest prefix of snaps (bisected) under which predictions on ``seqs`` are unchanged."""
    import copy

    target = run_predict(rnn, seqs)
    work = copy.deepcopy(rnn)
    flat = [p.view(-1) for p in _params(work)]
    index = [(i, j) for i, p in enumerate(flat) for j in range(p.numel())]
    total = len(index)
    for q in denominators:
        free = [(i, j) for i, j in index if abs(float(flat[i][j]) * q - round(float(flat[i][j]) * q)) > 1e-12]
        if not free:
            index = []
            break
        free.sort(key=lambda ij: abs(float(flat[ij[0]][ij[1]]) * q - round(float(flat[ij[0]][ij[1]]) * q)))
        original = [float(flat[i][j]) for i, j in free]

        def attempt(k: int) -> bool:
            for (i, j), v in zip(free, original):
                flat[i][j] = v
            for i, j in free[:k]:
                flat[i][j] = round(float(flat[i][j]) * q) / q
            return bool(np.array_equal(run_predict(work, seqs), target))

        lo, hi = 0, len(free)
        if attempt(hi):
            lo = hi
        else:
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (mid, hi) if attempt(mid) else (lo, mid)
        attempt(lo)
        index = free[lo:]
    return Quantised(work, total - len(index), total)
