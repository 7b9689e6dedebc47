"""The recurrent network the algorithmic tasks train: ``h_t = f([h_{t-1}, x_t])``, ``y_t = g(h_t)``.

``f`` and ``g`` are small MLPs (``nn.Sequential`` of ``nn.Linear`` with ReLU between layers and none
after the last), so ``f`` with no hidden layer is the linear recurrence ``h_t = W h_{t-1} + U x_t + b``
that program extraction can normalise in closed form. Inputs are the task's integer symbols as real
numbers (``[batch, T, input_dim]``), not one-hot: the hidden state then tends to an integer lattice.
The output at every step is ``output_dim`` class logits (``output_kind="classes"``) or one real value
rounded to the nearest integer (``output_kind="value"``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["RNNShape", "TaskRNN", "mlp"]


@dataclass(frozen=True)
class RNNShape:
    """Sizes of a :class:`TaskRNN`: hidden width and the hidden widths of ``f`` and ``g``."""

    input_dim: int
    hidden_dim: int
    output_dim: int
    f_hidden: tuple[int, ...] = ()
    g_hidden: tuple[int, ...] = ()
    output_kind: str = "classes"

    def __post_init__(self) -> None:
        if self.output_kind not in ("classes", "value"):
            raise ValueError(f"output_kind must be 'classes' or 'value', not {self.output_kind!r}")
        if self.output_kind == "value" and self.output_dim != 1:
            raise ValueError(f"output_kind='value' needs output_dim=1, not {self.output_dim}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["f_hidden"], d["g_hidden"] = list(self.f_hidden), list(self.g_hidden)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RNNShape":
        return cls(**{**d, "f_hidden": tuple(d.get("f_hidden", ())), "g_hidden": tuple(d.get("g_hidden", ()))})


def mlp(widths: list[int]) -> nn.Sequential:
    """Linear layers through ``widths`` with ReLU between them and nothing after the last."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        if i:
            layers.append(nn.ReLU())
        layers.append(nn.Linear(a, b))
    return nn.Sequential(*layers)


class TaskRNN(nn.Module):
    """``h_t = f(cat[h_{t-1}, x_t])`` from ``h_0`` (a learned vector), ``y_t = g(h_t)``."""

    def __init__(self, shape: RNNShape) -> None:
        super().__init__()
        self.shape = shape
        n, d = shape.hidden_dim, shape.input_dim
        self.f = mlp([n + d, *shape.f_hidden, n])
        self.g = mlp([n, *shape.g_hidden, shape.output_dim])
        self.h0 = nn.Parameter(torch.zeros(n))

    def step(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """One recurrence step: ``h [batch, n]``, ``x [batch, input_dim]`` -> the next ``h``."""
        return self.f(torch.cat([h, x], dim=-1))

    def hidden_states(self, x: torch.Tensor) -> torch.Tensor:
        """``h_1 … h_T`` for inputs ``x [batch, T, input_dim]`` -> ``[batch, T, hidden_dim]``."""
        h = self.h0.expand(x.shape[0], -1)
        states = []
        for t in range(x.shape[1]):
            h = self.step(h, x[:, t])
            states.append(h)
        return torch.stack(states, dim=1) if states else x.new_zeros(x.shape[0], 0, self.shape.hidden_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Per-step outputs ``[batch, T, output_dim]`` (logits, or values) for ``x [batch, T, input_dim]``."""
        return self.g(self.hidden_states(x))

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Per-step integer predictions ``[batch, T]``: argmax of the logits, or the rounded value."""
        y = self(x)
        if self.shape.output_kind == "classes":
            return y.argmax(-1)
        return torch.round(y[..., 0]).long()
