"""Reaches of the vlm adapter: a block output hooked ahead of transformers' own hooks, output fields, and
Qwen2-VL's flat vision activations (every image's patches in one sequence) seen one image per row."""

from __future__ import annotations

import sys

import torch
from torch import nn

from crosspatch.engine.reach import installing, submodule

__all__ = ["OutputFirst", "TokenGrid", "OutputField", "PerImage", "FlatHeadOut", "FlatAttentionPattern"]


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


class TokenGrid:
    """A module output laid out as a grid of tokens ``[images, h, w, d]`` (Aya Vision's and Command A Vision's
    projectors), read and written as ``[images, h * w, d]``."""

    def __init__(self, root: nn.Module):
        self.root = root

    def install(self, layer: int | None, callback) -> list:
        def hook(module, args, output):
            new = callback(output.flatten(1, -2))
            return None if new is None else new.reshape(output.shape)

        with installing() as changes:
            changes.forward_hook(self.root, hook)
            return changes.handles


class OutputField:
    """A field of a module's output (a transformers ``ModelOutput``: the model's ``logits``, the vision tower's
    ``pooler_output``), read and written by a forward hook."""

    def __init__(self, root: nn.Module, field: str):
        self.root, self.field = root, field

    def install(self, layer: int | None, callback) -> list:
        field = self.field

        def hook(module, args, output):
            new = callback(output[field])
            if new is None:
                return None
            output[field] = new
            return output

        with installing() as changes:
            changes.forward_hook(self.root, hook)
            return changes.handles


class _Images:
    """How many images the vision tower of a Qwen2-VL-style model runs in the current forward, read off its
    ``grid_thw`` argument by a pre-hook (the tower's sequence is flat over every image's patches)."""

    def __init__(self, visual: nn.Module):
        self.visual, self.count = visual, None

    def install(self, changes) -> None:
        def hook(module, args, kwargs):
            grid = kwargs["grid_thw"] if "grid_thw" in kwargs else args[1]
            self.count = int(grid.shape[0])

        changes.forward_pre_hook(self.visual, hook, with_kwargs=True)

    def split(self, value: torch.Tensor) -> torch.Tensor:
        """``[images * n, ...]`` as ``[images, n, ...]``."""
        rows = self.count
        if rows is None or value.shape[0] % rows:
            raise RuntimeError(f"a flat vision activation of {value.shape[0]} positions does not split into {rows} images")
        return value.reshape(rows, value.shape[0] // rows, *value.shape[1:])


class PerImage:
    """A reach over a flat vision activation ``[images * n, ...]`` (Qwen2-VL's tower and merger), called back
    with ``[images, n, ...]``, one image per row; a new value is flattened back. ``inner`` is the reach on
    the flat tensor (a module's output or input)."""

    def __init__(self, visual: nn.Module, inner):
        self.visual, self.inner = visual, inner

    def install(self, layer: int | None, callback) -> list:
        images = _Images(self.visual)

        def per_image(value: torch.Tensor):
            new = callback(images.split(value))
            return None if new is None else new.reshape(value.shape)

        with installing() as changes:
            images.install(changes)
            return changes.handles + self.inner.install(layer, per_image)


class FlatHeadOut:
    """Each head's write through a flat attention's output projection, ``[images, n, head, d_model]``: the
    projection's input holds the heads side by side (``[images * n, heads * d_head]``); head ``h``'s write is
    its slice times its columns of the weight, and the writes plus the bias sum to the projection's output.
    A new value is written back as ``output + sum_h(new_h - old_h)``, so unchanged heads change nothing."""

    def __init__(self, visual: nn.Module, root: nn.Module, path: str, n_heads: int):
        from crosspatch.adapters.transformers.reaches import HeadOut

        self.visual, self.heads = visual, HeadOut(root, path, n_heads, conv1d=False)

    def writes(self, z: torch.Tensor, layer: int | None) -> torch.Tensor:
        return self.heads.writes(z, layer)

    def install(self, layer: int | None, callback) -> list:
        images, n_heads, per_head = _Images(self.visual), self.heads.n_heads, self.heads._per_head

        def hook(module, args, output):
            z = images.split(args[0].to(output.device))
            z = z.reshape(*z.shape[:-1], n_heads, z.shape[-1] // n_heads)
            heads = torch.einsum("bphe,hed->bphd", z, per_head(module))
            new = callback(heads)
            if new is None:
                return None
            return output + (new - heads).sum(dim=2).reshape(output.shape)

        with installing() as changes:
            images.install(changes)
            changes.forward_hook(submodule(self.heads.root, self.heads.path, layer), hook)
            return changes.handles


class FlatAttentionPattern:
    """Attention patterns ``[images, head, n, n]`` of a flat vision attention that attends within chunks of
    ``cu_seqlens`` (Qwen2-VL's ``VisionAttention``: fused ``qkv``, 2-d rotary positions, ``proj``; a chunk is
    an image, or a window of one in Qwen2.5-VL's windowed layers). While hooked, the module's forward is
    replaced by an eager one that runs every image as one row of a batch (all images of one size), with the
    keys outside a query's chunk masked (probability 0, as if the chunks were run apart), calls back with the
    pattern and uses what it returns; the module's own forward is put back when the handle is removed."""

    def __init__(self, root: nn.Module, path: str):
        self.root, self.path = root, path

    def install(self, layer: int | None, callback) -> list:
        module = submodule(self.root, self.path, layer)
        rotary = sys.modules[type(module).__module__].apply_rotary_pos_emb_vision
        images = _Images(self.root)

        def forward(hidden_states, cu_seqlens, position_embeddings=None, **kwargs):
            n_total, heads = hidden_states.shape[0], module.num_heads
            chunk = torch.repeat_interleave(torch.arange(len(cu_seqlens) - 1, device=cu_seqlens.device),
                                            cu_seqlens[1:] - cu_seqlens[:-1])
            chunk = images.split(chunk)  # [images, n]: the chunk of each patch
            if bool((chunk[1:, :1] == chunk[:-1, -1:]).any()):
                raise ValueError("a chunk of the vision attention spans two images; the pattern is served for "
                                 "chunks within one image")
            q, k, v = module.qkv(hidden_states).reshape(n_total, 3, heads, -1).permute(1, 0, 2, 3).unbind(0)
            q, k = rotary(q, k, *position_embeddings)
            q, k, v = (images.split(t).transpose(1, 2) for t in (q, k, v))
            scores = torch.matmul(q, k.transpose(2, 3)) * module.scaling
            apart = (chunk[:, :, None] != chunk[:, None, :]).unsqueeze(1)  # [images, 1, query, key]
            scores = scores.masked_fill(apart, float("-inf"))
            wide = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
            pattern = torch.softmax(scores, dim=-1, dtype=wide).to(q.dtype)
            new = callback(pattern)
            if new is not None:
                pattern = new
            out = torch.matmul(pattern, v).transpose(1, 2).reshape(n_total, -1)
            return module.proj(out)

        def restore():
            if module.__dict__.get("forward") is forward:
                del module.__dict__["forward"]

        if "forward" in module.__dict__:
            raise RuntimeError(f"{self.path.format(layer=layer)}.forward is replaced already (its pattern is hooked twice?)")
        with installing() as changes:
            images.install(changes)
            changes.undo(restore)
            module.forward = forward
            return changes.handles
