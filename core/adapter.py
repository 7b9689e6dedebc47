"""The adapter contract: what an architecture plugin provides so the engine can serve a model."""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from .catalog import Catalog

__all__ = ["Adapter", "AdapterError", "Inputs", "batch_size", "repeat_rows", "model_device"]

Inputs = dict[str, torch.Tensor]


class AdapterError(TypeError):
    """No adapter serves a model, or an adapter cannot serve this one."""


class Adapter:
    """Maps one architecture family onto the site vocabulary.

    Subclasses set ``name`` and implement :meth:`matches`, :meth:`catalog`, :meth:`prepare`,
    :meth:`forward` and :meth:`output`. Register an instance with the ``register_adapters`` hook.
    """

    name: str = ""

    def matches(self, model: nn.Module) -> bool:
        """True when this adapter is meant for ``model``. Must not import heavy libraries."""
        raise NotImplementedError

    def catalog(self, model: nn.Module) -> Catalog:
        """Every site family of ``model`` with its axes, sizes and reach."""
        raise NotImplementedError

    def prepare(self, model: nn.Module, inputs: Any) -> Inputs:
        """Normalise user inputs into a dict of batched tensors on the model's device."""
        raise NotImplementedError

    def forward(self, model: nn.Module, inputs: Inputs) -> Any:
        """Run the model on prepared inputs and return its raw output."""
        raise NotImplementedError

    def output(self, raw: Any) -> torch.Tensor:
        """The primary output tensor (logits, reconstruction, embedding) of a raw output."""
        return raw

    def sizes(self, inputs: Inputs) -> dict[str, int]:
        """Sizes of axes that depend on the input (``pos``), for expanding ``*``."""
        return {}

    def describe(self, model: nn.Module) -> dict[str, Any]:
        """A JSON-able summary of the model for result metadata."""
        return {"class": type(model).__name__}


def batch_size(inputs: Mapping[str, torch.Tensor]) -> int:
    for value in inputs.values():
        if isinstance(value, torch.Tensor):
            return value.shape[0]
    raise ValueError("the inputs hold no tensor, so they have no batch size")


def repeat_rows(inputs: Mapping[str, Any], times: int) -> Inputs:
    """Tile every batched tensor ``times`` along the batch axis (block order: all rows, then again)."""
    if times == 1:
        return dict(inputs)
    return {
        k: v.repeat(times, *([1] * (v.ndim - 1))) if isinstance(v, torch.Tensor) and v.ndim > 0 else v
        for k, v in inputs.items()
    }


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")
