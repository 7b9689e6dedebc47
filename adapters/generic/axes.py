"""Axis names for an activation seen in a probe: ``pos`` / ``dim`` where the model gives hints, else ``d1``, ``d2``, ...

``d<k>`` is always the ``k``-th axis after the batch axis. The hints come from a transformers-style
``model.config.hidden_size`` (read by duck typing; nothing is imported) and the inputs' sequence length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import nn

__all__ = ["AxisHints", "axis_names", "sequence_length"]


@dataclass(frozen=True)
class AxisHints:
    """What names an axis beyond its position: the model's hidden size and the inputs' sequence length."""

    hidden: int | None = None
    seq: int | None = None

    @classmethod
    def read(cls, model: nn.Module, inputs: Mapping[str, Any]) -> "AxisHints":
        hidden = getattr(getattr(model, "config", None), "hidden_size", None)
        if not isinstance(hidden, int) or isinstance(hidden, bool) or hidden < 1:
            return cls()
        return cls(hidden, sequence_length(inputs))


def sequence_length(inputs: Mapping[str, Any]) -> int | None:
    """The length of token inputs: ``input_ids`` / ``inputs_embeds``, or a positional ``[batch, pos]`` of ids."""
    for key in ("input_ids", "inputs_embeds"):
        value = inputs.get(key)
        if isinstance(value, torch.Tensor) and value.ndim >= 2:
            return value.shape[1]
    first = inputs.get("0")
    if isinstance(first, torch.Tensor) and first.ndim == 2 and not first.is_floating_point():
        return first.shape[1]
    return None


def axis_names(shape: Sequence[int], hints: AxisHints) -> tuple[str, ...]:
    """Names for the axes after the batch axis of an activation of that ``shape`` (batch axis excluded)."""
    names = [f"d{i + 1}" for i in range(len(shape))]
    if hints.hidden is None:
        return tuple(names)
    if len(shape) == 1 and shape[0] == hints.hidden:
        return ("dim",)
    if len(shape) == 2 and shape[1] == hints.hidden:
        return ("pos", "dim")
    if len(shape) == 2 and shape[0] == hints.seq:
        return ("pos", names[1])
    return tuple(names)
