"""Sites at modules that see a block's tokens flattened (OPT reshapes ``[batch, pos, d]`` to
``[batch * pos, d]`` before its MLP): the reach's value is handed on as ``[batch, pos, ...]`` and a
replacement flattened back."""

from __future__ import annotations

import torch
from torch import nn

from crosspatch.engine.reach import Callback, Handle, Reach, installing, submodule

__all__ = ["Unflattened"]


class Unflattened:
    """``reach`` with its values unflattened to the ``[batch, pos]`` of the block's input (read by a pre-hook
    on the block, which runs before the module)."""

    def __init__(self, reach: Reach, root: nn.Module, block: str):
        self.reach, self.root, self.block = reach, root, block

    def install(self, layer: int | None, callback: Callback) -> list[Handle]:
        rows: list[tuple[int, int]] = []

        def shape(module, args, kwargs):
            x = args[0] if args and isinstance(args[0], torch.Tensor) else kwargs["hidden_states"]
            rows[:] = [tuple(x.shape[:2])]

        def unflattened(value: torch.Tensor):
            b, p = rows[0]
            if value.shape[0] != b * p:
                raise RuntimeError(f"expected {b} x {p} tokens flattened, got a value of shape {tuple(value.shape)}")
            new = callback(value.unflatten(0, (b, p)))
            return None if new is None else new.flatten(0, 1)

        block = submodule(self.root, self.block, layer)
        with installing() as changes:
            changes.forward_pre_hook(block, shape, with_kwargs=True)
            changes.handles.extend(self.reach.install(layer, unflattened))  # the reach registers its own undo
            return changes.handles
