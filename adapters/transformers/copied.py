"""Sites at branch modules whose output the block changes in place after they return (Falcon's parallel block
runs ``mlp_output += attention_output``): the reach hands the block a copy, so a captured value stays the
module's write and a patched value's source is not overwritten."""

from __future__ import annotations

import torch

from crosspatch.engine.reach import Callback, Handle, Reach

__all__ = ["HandedCopy"]


class HandedCopy:
    """``reach``, with what it hands on to the model (its value, or the value written) copied first."""

    def __init__(self, reach: Reach):
        self.reach = reach

    def install(self, layer: int | None, callback: Callback) -> list[Handle]:
        def copied(value: torch.Tensor):
            new = callback(value)
            return (value if new is None else new).clone()

        return self.reach.install(layer, copied)
