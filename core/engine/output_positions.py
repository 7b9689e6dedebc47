"""Running an output head at one position per row: what a run needs when its metric reads one position.

A language model's head maps ``[rows, pos, d]`` to ``[rows, pos, vocab]``; a metric such as
``logit_diff`` reads one position of it. :func:`restrict` hooks the head so that it computes that
position only and hands on a full-size output with zeros elsewhere: the metric's numbers (and their
gradients) are unchanged, the head's cost drops by the number of positions.
"""

from __future__ import annotations

import torch
from torch import nn

from .reach import Handle, installing

__all__ = ["restrict"]


def restrict(head: nn.Module, positions: torch.Tensor) -> list[Handle]:
    """Hooks on ``head`` (called on ``[rows, pos, d]``) that compute row ``r``'s output at ``positions[r]``
    only; the output keeps its ``[rows, pos, out]`` shape with zeros at the other positions."""
    shapes: list[torch.Size] = []

    def gather(module, args):
        hidden = args[0]
        if hidden.ndim != 3 or hidden.shape[0] != positions.shape[0]:
            raise ValueError(
                f"{type(module).__name__} got input {tuple(hidden.shape)}; computing it at one position per row "
                f"needs [rows={positions.shape[0]}, pos, dim]"
            )
        shapes.append(hidden.shape)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return (hidden[rows, positions.to(hidden.device)].unsqueeze(1), *args[1:])

    def scatter(module, args, output):
        rows_, length, _ = shapes.pop()
        full = output.new_zeros(rows_, length, output.shape[-1])
        rows = torch.arange(rows_, device=output.device)
        full[rows, positions.to(output.device)] = output[:, 0]
        return full

    # Other hooks of the module (installed before) see its input and output whole: gathering runs after
    # their pre-hooks, scattering before their hooks.
    with installing() as changes:
        changes.forward_pre_hook(head, gather)
        changes.forward_hook(head, scatter, prepend=True)
        return changes.handles
