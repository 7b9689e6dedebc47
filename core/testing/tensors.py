"""Tensor helpers of the checks: comparing two results (with tolerance or exactly), wording a difference,
mapping over nested inputs, and a snapshot of a model's parameters and buffers.

Every check compares activations and outputs the same way, so the tolerance (:data:`RTOL` with the
caller's ``atol``) and the wording of a difference live here once.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from torch import nn

#: Relative tolerance used with ``atol`` wherever two computations need not be bit-identical.
RTOL = 1e-5


def max_diff(a: torch.Tensor, b: torch.Tensor) -> str:
    if a.shape != b.shape:
        return f"shapes {tuple(a.shape)} and {tuple(b.shape)}"
    if a.numel() == 0:
        return "empty"
    return f"max |diff| = {(a.detach().double() - b.detach().double().to(a.device)).abs().max().item():.3g}"


def close(a: torch.Tensor, b: torch.Tensor, atol: float) -> bool:
    if a.shape != b.shape:
        return False
    return torch.allclose(a.detach().double(), b.detach().double().to(a.device), rtol=RTOL, atol=atol, equal_nan=True)


def exact(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b.to(a.device))


def map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, Mapping):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(map_tensors(v, fn) for v in obj)
    return obj


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every parameter and buffer by name, shared ones under each of their names."""
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(model.named_buffers(remove_duplicate=False))
    return {k: v.detach().clone() for k, v in tensors.items()}
