"""Discrete variables read from the residual stream.

A compiled (tracr) model lays its residual out in named subspaces, one label per dimension:
``name:value`` for a one-hot categorical variable, ``name`` alone for a numerical one
(:class:`Layout`). A trained model has no labels: its heads are read by what they aggregate
(:func:`crosspatch.methods.decompile.match.match_head_codes`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

__all__ = ["Layout", "Variable", "parse_value"]

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
