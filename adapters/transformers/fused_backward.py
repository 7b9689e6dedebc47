"""A one-node backward for activations that transformers writes as a chain of element-wise ops.

GPT-2's ``NewGELUActivation`` (also ``FastGELUActivation`` and ``AccurateGELUActivation``) computes
the tanh approximation of GELU in seven autograd ops, so a backward pass through it makes seven
element-wise passes over the MLP's hidden layer: a tenth of a whole backward in a small GPT-2. In
gradient runs the module's output is handed on as the module computed it (the same values, bit for
bit) through one autograd node whose backward is torch's fused ``gelu_backward(approximate="tanh")``:
the derivative of the same function, equal to autograd's through the chain up to rounding.

The hook is prepended, so it sees the module's own output before any other hook of the module; a
global forward hook (which runs first) turns it off, since the output it sees could be another one.
"""

from __future__ import annotations

import torch
from torch import nn

from crosspatch.engine.reach import installing

__all__ = ["gelu_tanh_hooks"]


def _tanh_gelu_classes() -> tuple[type, ...]:
    from transformers import activations

    names = ("NewGELUActivation", "FastGELUActivation", "AccurateGELUActivation")
    return tuple(getattr(activations, n) for n in names if hasattr(activations, n))


class _TanhGelu(torch.autograd.Function):
    """Value ``y`` (the module's own output at ``x``); gradient ``gelu_tanh'(x) * g`` to ``x``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return y

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (x,) = ctx.saved_tensors
        return torch.ops.aten.gelu_backward(g, x, approximate="tanh"), None


def _hook(module: nn.Module, args: tuple, output):
    x = args[0] if args else None
    if not (torch.is_grad_enabled() and isinstance(x, torch.Tensor) and x.requires_grad and isinstance(output, torch.Tensor)):
        return None
    return _TanhGelu.apply(x, output.detach())


def gelu_tanh_hooks(model: nn.Module) -> list:
    """Hooks giving every tanh-GELU module of ``model`` the fused backward; the caller removes them."""
    if nn.modules.module._global_forward_hooks:
        return []
    classes = _tanh_gelu_classes()
    with installing() as changes:
        for m in model.modules():
            if isinstance(m, classes):
                changes.forward_hook(m, _hook, prepend=True)
        return changes.handles
