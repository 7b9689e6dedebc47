"""Discrete variables read from the residual stream.

A compiled (tracr) model lays its residual out in named subspaces, one label per dimension:
``name:value`` for a one-hot categorical variable, ``name`` alone for a numerical one
(:class:`Layout`). A trained model has no labels: :func:`cluster_codes` turns a component's
output vectors into discrete codes by greedy radius clustering, and those codes are its variable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

__all__ = ["Layout", "Variable", "cluster_codes", "parse_value"]

_SKIP = {"one"}


def parse_value(text: str) -> Any:
    """``"3"`` -> 3, ``"0.5"`` -> 0.5, anything else stays a string."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


@dataclass
class Variable:
    """One variable of the residual: its dimensions and, if categorical, the value of each dimension."""

    name: str
    numerical: bool
    dims: list[int]
    values: list[Any] = field(default_factory=list)

    def decode(self, x: torch.Tensor) -> list[list[Any]]:
        """``x [b, T, d]`` -> the variable's value per sequence and position (``None``: empty)."""
        sub = x[..., self.dims].float()
        if self.numerical:
            return [[round(float(v), 4) for v in row] for row in sub[..., 0].tolist()]
        best, idx = sub.max(dim=-1)
        vals = [[self.values[i] if b > 0.5 else None for i, b in zip(ri, rb)] for ri, rb in zip(idx.tolist(), best.tolist())]
        return vals


@dataclass
class Layout:
    """The named subspaces of a residual stream (tracr's ``residual_labels``)."""

    variables: dict[str, Variable]

    @classmethod
    def from_labels(cls, labels: Sequence[str], bos: str | None = None, pad: str | None = None) -> "Layout":
        out: dict[str, Variable] = {}
        for i, label in enumerate(labels):
            if label in _SKIP:
                continue
            if ":" in label:
                name, raw = label.split(":", 1)
                if raw == pad:
                    continue
                value = "BOS" if raw == bos else parse_value(raw)
                var = out.setdefault(name, Variable(name, False, []))
                var.dims.append(i)
                var.values.append(value)
            else:
                out[label] = Variable(label, True, [i])
        return cls(out)

    def written(self, delta: torch.Tensor, tol: float = 1e-3) -> list[str]:
        """Names of the variables a component's output ``delta [b, T, d]`` touches."""
        mag = delta.detach().abs().flatten(0, -2).max(dim=0).values
        return [n for n, v in self.variables.items() if float(mag[v.dims].max()) > tol]


def cluster_codes(vectors: np.ndarray, radius: float | None = None, max_codes: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Discrete codes for ``vectors [n, d]``: greedy leader clustering at ``radius`` (default: 10 % of
    the largest distance to the mean). Returns ``(codes [n], centres [k, d])``; codes are 0..k-1 in
    order of first appearance, so equal vectors get equal codes and the result is deterministic."""
    v = np.asarray(vectors, dtype=np.float64)
    if radius is None:
        spread = float(np.linalg.norm(v - v.mean(axis=0), axis=1).max()) if len(v) else 0.0
        radius = max(0.1 * spread, 1e-6)
    centres: list[np.ndarray] = []
    codes = np.empty(len(v), dtype=np.int64)
    for i, x in enumerate(v):
        if centres:
            d = np.linalg.norm(np.stack(centres) - x, axis=1)
            j = int(d.argmin())
            if d[j] <= radius or len(centres) >= max_codes:
                codes[i] = j
                continue
        centres.append(x)
        codes[i] = len(centres) - 1
    return codes, np.stack(centres) if centres else np.zeros((0, v.shape[1] if v.ndim == 2 else 0))
