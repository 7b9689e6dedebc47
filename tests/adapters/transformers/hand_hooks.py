"""Hand-written hooks for tests of inferred sites: the model's logits with one raw torch hook in place, and
a hook that zeroes one head's slice of an output projection's input. Imported as ``hand_hooks``
(this directory is on ``sys.path`` under pytest's rootdir-relative imports)."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def logits_with(model: nn.Module, module: nn.Module, hook: Callable, x: torch.Tensor, pre: bool = False) -> torch.Tensor:
    """``model(x).logits`` with ``hook`` on ``module`` (a forward pre-hook when ``pre``), removed after."""
    handle = module.register_forward_pre_hook(hook) if pre else module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            return model(x).logits
    finally:
        handle.remove()


def zero_head(head: int, d_head: int) -> Callable:
    """A pre-hook zeroing head ``head``'s ``d_head`` features of a projection's input."""

    def hook(module, args):
        z = args[0].clone()
        z[..., head * d_head:(head + 1) * d_head] = 0
        return (z, *args[1:])

    return hook
