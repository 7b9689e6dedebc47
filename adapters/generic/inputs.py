"""Inputs of the generic adapter: what a user passes, as named tensors, and back as a call's arguments.

Positional arguments are stored under the keys ``"0"``, ``"1"``, ... (never a keyword's name), keyword
arguments under their names: a tensor is ``model(x)``, a tuple or list of tensors ``model(x, y)``, a
mapping ``model(**inputs)``. Tensors go to the model's device; floating ones to its floating dtype.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from crosspatch.engine.adapter import Inputs, model_device

__all__ = ["as_inputs", "call_arguments", "model_dtype"]


def model_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype of the model's first floating-point parameter (or buffer); None when it has none."""
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype
    return None


def as_inputs(model: nn.Module, inputs: Any) -> Inputs:
    if isinstance(inputs, Mapping):
        items = {str(k): v for k, v in inputs.items()}
    elif isinstance(inputs, (tuple, list)) and inputs and all(isinstance(v, torch.Tensor) for v in inputs):
        items = {str(i): v for i, v in enumerate(inputs)}
    else:
        items = {"0": inputs if isinstance(inputs, torch.Tensor) else torch.as_tensor(inputs)}
    device, dtype = model_device(model), model_dtype(model)

    def move(value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        return value.to(device=device, dtype=dtype if dtype is not None and value.is_floating_point() else None)

    return {k: move(v) for k, v in items.items()}


def call_arguments(inputs: Mapping[str, Any]) -> tuple[tuple, dict[str, Any]]:
    """The positional and keyword arguments the inputs stand for."""
    positional = sorted((int(k), v) for k, v in inputs.items() if k.isascii() and k.isdigit())
    if [i for i, _ in positional] != list(range(len(positional))):
        raise ValueError(f"positional inputs must be numbered 0, 1, ... without gaps; got {[i for i, _ in positional]}")
    keywords = {k: v for k, v in inputs.items() if not (k.isascii() and k.isdigit())}
    return tuple(v for _, v in positional), keywords
