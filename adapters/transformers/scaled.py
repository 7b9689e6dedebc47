"""The write of a branch the block multiplies by a layer scale inline (BEiT, data2vec-vision:
``hidden = residual + lambda_1 * attention(...)``), where no module outputs the scaled value."""

from __future__ import annotations

import torch
from torch import nn

from crosspatch.engine.reach import Callback, Handle, installing, submodule

__all__ = ["ScaledWrite"]


class ScaledWrite:
    """``scale * output`` of the module at ``path``, ``scale`` the block's parameter ``scale``; written back
    as ``new / scale`` (a value equal to the one read is left alone, so a self-patch changes nothing)."""

    def __init__(self, root: nn.Module, block: str, path: str, scale: str):
        self.root, self.block, self.path, self.scale = root, block, path, scale

    def install(self, layer: int | None, callback: Callback) -> list[Handle]:
        block = submodule(self.root, self.block, layer)
        scale = block.get_parameter(self.scale)
        if not bool((scale != 0).all()):
            raise ValueError(f"{self.block.format(layer=layer)}.{self.scale} has zeros: a write through it cannot be undone")

        def hook(module, args, output):
            value = output if isinstance(output, torch.Tensor) else output[0]
            write = value * scale.to(value.device)
            new = callback(write)
            if new is None or (new is write) or (not new.requires_grad and torch.equal(new, write)):
                return None
            back = (new / scale.to(new.device)).to(value.dtype)
            return back if isinstance(output, torch.Tensor) else (back, *output[1:])

        module = block.get_submodule(self.path)
        with installing() as changes:
            changes.forward_hook(module, hook)
            return changes.handles
