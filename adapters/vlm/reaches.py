"""Reaches of the vlm adapter: a block output hooked ahead of transformers' own hooks, and the logits field."""

from __future__ import annotations

import torch
from torch import nn

from crosspatch.engine.reach import installing, submodule

__all__ = ["OutputFirst", "LogitsField"]


class OutputFirst:
    """A module's output (element 0 of a tuple), hooked ahead of the hooks already there.

    transformers records the vision tower's hidden states with forward hooks of its own on each block; the
    projector reads the last one from that record. Hooked first, a write to the block's output is what
    the record holds, so it reaches the projector."""

    def __init__(self, root: nn.Module, path: str):
        self.root, self.path = root, path

    def install(self, layer: int | None, callback) -> list:
        def hook(module, args, output):
            value = output if isinstance(output, torch.Tensor) else output[0]
            new = callback(value)
            if new is None:
                return None
            return new if isinstance(output, torch.Tensor) else (new, *output[1:])

        with installing() as changes:
            changes.forward_hook(submodule(self.root, self.path, layer), hook, prepend=True)
            return changes.handles


class LogitsField:
    """The ``logits`` field of the top-level model's output, read and written by a forward hook."""

    def __init__(self, root: nn.Module):
        self.root = root

    def install(self, layer: int | None, callback) -> list:
        def hook(module, args, output):
            new = callback(output["logits"])
            if new is None:
                return None
            output["logits"] = new
            return output

        with installing() as changes:
            changes.forward_hook(self.root, hook)
            return changes.handles
