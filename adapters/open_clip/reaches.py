"""Reaches inside open_clip residual attention blocks.

A block computes ``x + ls_1(attn(ln_1(x)))`` then ``+ ls_2(mlp(ln_2(x)))``; ``ls_1`` and ``ls_2`` are
LayerScale modules or ``nn.Identity`` and are always called as modules, so their outputs are exactly
what attention and the MLP write into the residual stream.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from crosspatch.engine.reach import Callback, Handle, installing, submodule

__all__ = ["AttentionPattern", "HeadWrite", "ResidualMid", "RunningModules"]


def _gamma(module: nn.Module) -> torch.Tensor | None:
    """The LayerScale factor of ``ls_1`` (None for ``nn.Identity``)."""
    return None if isinstance(module, nn.Identity) else getattr(module, "gamma", None)


class AttentionPattern:
    """Attention probabilities ``[batch, head, pos, key_pos]``, read and written at the unfused
    attention's ``pattern`` hook point. ``resolve(layer)`` gives the unfused attention module that
    runs in that layer (the model's own when it is unfused, else the twin swapped in during runs)."""

    def __init__(self, resolve: Callable[[int], nn.Module]):
        self.resolve = resolve

    def install(self, layer: int | None, callback: Callback) -> list[Handle]:
        def hook(module, args, output):
            return callback(output)

        module = self.resolve(layer).pattern
        with installing() as changes:
            changes.forward_hook(module, hook)
            return changes.handles


class HeadWrite:
    """Each head's exact write into the residual stream, ``[batch, pos, head, d_model]``.

    The heads enter ``out_proj`` side by side; head ``h`` writes ``gamma * (z_h @ W_h)`` where ``W_h``
    are its columns of the projection and ``gamma`` the block's LayerScale (1 without one). The
    heads plus ``gamma * out_proj.bias`` sum to ``attn_out``. A new value is written back as
    ``attn_out + sum_h(new_h - old_h)``, so unchanged heads change nothing.
    """

    def __init__(self, root: nn.Module, out_proj: str, scale: str, n_heads: int):
        self.root, self.out_proj, self.scale, self.n_heads = root, out_proj, scale, n_heads

    def writes(self, z: torch.Tensor, layer: int | None) -> torch.Tensor:
        """Every head's write ``[batch, pos, head, d_model]`` from ``head_z`` ``[batch, pos, head, d_head]``
        (the projection's rows times LayerScale; no graph: for differences of captured values)."""
        proj = submodule(self.root, self.out_proj, layer)
        gamma = _gamma(submodule(self.root, self.scale, layer))
        with torch.no_grad():
            weight = proj.weight.T.to(z.device, z.dtype)  # [n_heads * d_head, d_model]
            heads = torch.einsum("bphe,hed->bphd", z, weight.reshape(self.n_heads, -1, weight.shape[-1]))
            return heads if gamma is None else heads * gamma.to(z.device, z.dtype)

    def install(self, layer: int | None, callback: Callback) -> list[Handle]:
        n_heads = self.n_heads
        proj = submodule(self.root, self.out_proj, layer)
        scale = submodule(self.root, self.scale, layer)
        stash: dict[str, torch.Tensor] = {}

        def before_projection(module, args):
            stash["z"] = args[0]

        def after_scale(module, args, output):
            z = stash.pop("z")
            weight = proj.weight.T  # [n_heads * d_head, d_model]
            d_in = z.shape[-1]
            per_head = weight.reshape(n_heads, d_in // n_heads, weight.shape[-1])
            heads = torch.einsum("bphe,hed->bphd", z.reshape(*z.shape[:-1], n_heads, d_in // n_heads), per_head)
            gamma = _gamma(module)
            if gamma is not None:
                heads = heads * gamma
            new = callback(heads)
            if new is None:
                return None
            return output + (new - heads).sum(dim=2)

        with installing() as changes:
            changes.forward_pre_hook(proj, before_projection)
            changes.forward_hook(scale, after_scale)
            return changes.handles


class ResidualMid:
    """``resid_mid``: the block input plus what attention writes (``ls_1``'s output).

    Written by shifting the attention write by ``new - old``, so the residual branch and the MLP's
    layer norm both see the new value.
    """

    def __init__(self, root: nn.Module, block: str, scale: str):
        self.root, self.block, self.scale = root, block, scale

    def install(self, layer: int | None, callback: Callback) -> list[Handle]:
        stash: dict[str, torch.Tensor] = {}

        def before_block(module, args, kwargs):
            stash["x"] = args[0] if args else kwargs.get("q_x", kwargs.get("x"))

        def after_scale(module, args, output):
            resid = output + stash.pop("x")
            new = callback(resid)
            if new is None:
                return None
            return output + (new - resid)

        block = submodule(self.root, self.block, layer)
        scale = submodule(self.root, self.scale, layer)
        with installing() as changes:
            changes.forward_pre_hook(block, before_block, with_kwargs=True)
            changes.forward_hook(scale, after_scale)
            return changes.handles


class RunningModules:
    """The model's modules as a run meets them, for reaches that look modules up by path
    (``get_submodule``, all :func:`crosspatch.reach.submodule` calls): ``<blocks>.<i>.attn[.<rest>]`` is the
    unfused attention that runs in layer ``i`` (``resolve(i)``: the block's own when it is unfused, else
    the twin swapped in during runs), every other path the model's own module.

    It lets :class:`crosspatch.adapters.transformers.inputs.HeadIn` reach the fused query/key/value
    projection (``attn.in_proj``) of a block whose ``nn.MultiheadAttention`` hides it outside runs.
    """

    def __init__(self, model: nn.Module, blocks: str, resolve: Callable[[int], nn.Module]):
        self.model, self.blocks, self.resolve = model, blocks, resolve

    def get_submodule(self, name: str) -> nn.Module:
        head = f"{self.blocks}."
        if name.startswith(head):
            index, _, rest = name[len(head):].partition(".")
            if index.isdigit() and (rest == "attn" or rest.startswith("attn.")):
                attn = self.resolve(int(index))
                return attn if rest == "attn" else attn.get_submodule(rest[len("attn."):])
        return self.model.get_submodule(name)
