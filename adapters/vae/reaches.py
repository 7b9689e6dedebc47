"""Reaches of the VAE adapter: posterior halves, per-head mid-block attention, hand-over points.

* :class:`ChannelSlice` reads channels ``start:stop`` of a module's output. diffusers keeps the
  posterior as ``moments = cat(mu, logvar)`` on the channel axis (the ``quant_conv`` output, or the
  encoder's output without ``quant_conv``); ``DiagonalGaussianDistribution`` is not a module, so
  ``latent.mu`` and ``latent.logvar`` are the two halves of that tensor, written back by concatenation.
* :class:`MidAttention` reads the mid-block attention at its output projection ``to_out[0]`` as a
  feature map (``attn_out``, ``[batch, channel, h, w]``) or per head (``head_out``,
  ``[batch, head, channel, h, w]``): head ``k``'s write is its slice of the projection input times
  its columns of the weight, so the heads plus the bias sum to the projection's output.
* :class:`Point` is a tensor the adapter's own forward hands over between ``encode`` and ``decode``
  of a plain torch VAE (``mu``, ``logvar``, ``z``, the reconstruction): there is no module boundary
  there, so the forward calls :func:`through` and the engine's callback sees and replaces the value.
"""

from __future__ import annotations

import weakref
from typing import Sequence

import torch
from torch import nn

from crosspatch.engine.reach import Callback, Handle, installing, submodule

__all__ = ["ChannelSlice", "MidAttention", "BlockOutput", "Point", "through"]


class ChannelSlice:
    """Channels ``start:stop`` of a module's output (``[batch, channels, ...]``)."""

    def __init__(self, root: nn.Module, path: str, start: int, stop: int):
        self.root, self.path, self.start, self.stop = root, path, start, stop

    def install(self, layer: int | None, callback: Callback) -> list[Handle]:
        start, stop = self.start, self.stop

        def hook(module, args, output):
            new = callback(output[:, start:stop])
            if new is None:
                return None
            result = output.clone()  # keeps the output's memory format (convolutions may pick channels-last)
            result[:, start:stop] = new
            return result

        module = submodule(self.root, self.path, layer)
        with installing() as changes:
            changes.forward_hook(module, hook)
            return changes.handles


class MidAttention:
    """A diffusers ``Attention`` on a feature map, read at ``to_out[0]`` (before the residual is added).

    ``per_head=False``: the projection's output as ``[batch, channel, h, w]``.
    ``per_head=True``: each head's share ``[batch, head, channel, h, w]``; a new value is written back
    as ``output + sum_k(new_k - old_k)``, so heads left unchanged change nothing.
    """

    def __init__(self, root: nn.Module, path: str, per_head: bool):
        self.root, self.path, self.per_head = root, path, per_head

    def install(self, layer: int | None, callback: Callback) -> list[Handle]:
        attn = submodule(self.root, self.path, layer)
        proj = attn.to_out[0]
        per_head = self.per_head
        shape: dict[str, tuple[int, int]] = {}

        def before(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            if x.ndim != 4:
                raise RuntimeError(
                    f"{self.path} received a {x.ndim}-d input; the VAE adapter reads mid-block attention "
                    f"on feature maps [batch, channel, h, w]"
                )
            shape["hw"] = (x.shape[2], x.shape[3])

        def after(module, args, output):
            h, w = shape["hw"]
            b, hw, channels = output.shape
            if not per_head:
                view = output.transpose(1, 2).reshape(b, channels, h, w)
                new = callback(view)
                if new is None:
                    return None
                result = torch.empty_like(output)  # the output's own layout, so later kernels do not change
                result.copy_(new.reshape(b, channels, hw).transpose(1, 2))
                return result
            heads = attn.heads
            z = args[0]
            d_head = z.shape[-1] // heads
            weight = module.weight.T.reshape(heads, d_head, channels)  # [heads, d_head, channel]
            parts = torch.einsum("bphe,hec->bphc", z.reshape(b, hw, heads, d_head), weight)
            view = parts.permute(0, 2, 3, 1).reshape(b, heads, channels, h, w)
            new = callback(view)
            if new is None:
                return None
            result = output.clone()
            result += (new - view).sum(dim=1).reshape(b, channels, hw).transpose(1, 2)
            return result

        with installing() as changes:
            changes.forward_pre_hook(attn, before, with_kwargs=True)
            changes.forward_hook(proj, after)
            return changes.handles


class BlockOutput:
    """The output of the ``layer``-th module of a list (blocks a plain torch VAE lists)."""

    def __init__(self, modules: Sequence[nn.Module], owner: str):
        self.modules, self.owner = list(modules), owner

    def install(self, layer: int | None, callback: Callback) -> list[Handle]:
        def hook(module, args, output):
            if not isinstance(output, torch.Tensor):
                raise RuntimeError(f"{self.owner}[{layer}] returned {type(output).__name__}; blocks must return a tensor")
            return callback(output)

        module = self.modules[layer]
        with installing() as changes:
            changes.forward_hook(module, hook)
            return changes.handles


# Callbacks of points, per model; a run adds its callbacks and its handles remove them.
_POINTS: "weakref.WeakKeyDictionary[nn.Module, dict[str, list[Callback]]]" = weakref.WeakKeyDictionary()


class _PointHandle:
    def __init__(self, model: nn.Module, name: str, callback: Callback):
        self.model, self.name, self.callback = weakref.ref(model), name, callback

    def remove(self) -> None:
        model = self.model()
        table = _POINTS.get(model) if model is not None else None
        if table is None:
            return
        callbacks = table.get(self.name)
        if callbacks is not None:
            for i, cb in enumerate(callbacks):
                if cb is self.callback:
                    del callbacks[i]
                    break
            if not callbacks:
                table.pop(self.name, None)
        if not table:
            _POINTS.pop(model, None)


class Point:
    """A named tensor that the adapter's forward passes through :func:`through`."""

    def __init__(self, root: nn.Module, name: str):
        self.root, self.name = root, name

    def install(self, layer: int | None, callback: Callback) -> list[Handle]:
        with installing() as changes:
            changes.add(_PointHandle(self.root, self.name, callback))  # before the callback is added
            _POINTS.setdefault(self.root, {}).setdefault(self.name, []).append(callback)
            return changes.handles


def through(model: nn.Module, name: str, value: torch.Tensor) -> torch.Tensor:
    """``value`` after every callback installed at point ``name`` of ``model`` (unchanged if none)."""
    table = _POINTS.get(model)
    if not table:
        return value
    for callback in list(table.get(name, ())):
        new = callback(value)
        if new is not None:
            value = _like(new, value)
    return value


def _like(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """``new`` laid out in memory like ``old`` (``mu`` is often a strided half of one tensor).

    Kernels pick different paths for different strides and round differently, so a write that keeps
    the values must also keep the layout for the run to stay bit-identical.
    """
    if new.shape != old.shape or new.stride() == old.stride() or 0 in old.stride():
        return new
    out = torch.empty_strided(old.shape, old.stride(), dtype=new.dtype, device=new.device)
    return out.copy_(new)
