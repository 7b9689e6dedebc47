"""Prefix reuse for transformers models (see :mod:`crosspatch.resume`).

Keeping a prefix runs the model once with a pre-hook on every block that records the residual
entering it, and, in causal models, with the key/value cache on. Resuming at block ``L`` runs
transformers' own forward with the block list cut to ``L..`` (restored afterwards) and the
recorded residual put in place of the embeddings at block ``L``; resuming at position ``p``
also passes only tokens ``p..`` with the recorded keys and values of tokens ``..p`` as the cache,
so masks, positions and rotary embeddings are whatever transformers computes for a cached run.
A run on its own inputs (``Resume.own_inputs``, block 0 only) embeds its tokens ``p..`` instead.

The resumed batch is the prefix's rows repeated, yet its cache holds each block's prefix keys and
values untiled (views of the prefix, no copy): a block's ``update`` builds the repeated prefix with
the new states after it in one new tensor and stores nothing, so each block's full keys and values
are freed when the block is done instead of all blocks' staying alive until the forward ends.
Sliding-window blocks get the same; other cache layer types are filled with the tiled prefix.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

import torch
from torch import nn

from crosspatch.engine.adapter import Inputs, batch_size
from crosspatch.engine.reach import submodule, temporarily
from crosspatch.engine.resume import Prefix, Resume

from .architectures import Architecture

_POSITIONAL = ("input_ids", "inputs_embeds", "token_type_ids", "position_ids")  # [batch, pos, ...] inputs


def _output_field(raw: Any) -> str:
    return "logits" if getattr(raw, "logits", None) is not None else "last_hidden_state"


def _cache_argument(model: nn.Module) -> str:
    params = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _blocks(model: nn.Module, arch: Architecture) -> nn.ModuleList:
    return submodule(model.base_model, arch.layers, None)


def forward_keeping_prefix(model: nn.Module, arch: Architecture, inputs: Inputs) -> tuple[Any, Prefix]:
    blocks = _blocks(model, arch)
    residuals: list[torch.Tensor | None] = [None] * len(blocks)

    def recorder(layer: int):
        def hook(module, args, kwargs):
            value = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            residuals[layer] = value.detach()

        return hook

    with temporarily() as changes:  # each hook's undo registered before the hook
        for i, block in enumerate(blocks):
            changes.forward_pre_hook(block, recorder(i), with_kwargs=True)
        extra = {"use_cache": True, **_recording_cache(model)} if arch.causal else {}
        raw = model(**inputs, **extra, return_dict=True)
    keys_values = []
    if arch.causal:
        field = "cache" if raw.get("cache") is not None else "past_key_values"
        keys_values = [(layer.keys.detach(), layer.values.detach()) for layer in raw[field].layers]
        raw[field] = None  # the prefix holds them; the output need not
    output = raw[_output_field(raw)]
    length = output.shape[1]
    prefix = Prefix(residuals, output.detach(), arch.causal, keys_values, length)  # type: ignore[arg-type]
    return raw, prefix


def _recording_cache(model: nn.Module) -> dict[str, Any]:
    """The cache argument for keeping a prefix: sliding-window layers must keep every position, not their window.

    Empty (the model makes its own cache) when the model has no sliding-window layers.
    """
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    if not any(cache.is_sliding):
        return {}
    cache.activate_past_recording()  # the window's past is kept, the states returned are the same
    return {_cache_argument(model): cache}


def mixes_layer_types(model: nn.Module) -> bool:
    """Whether the model's blocks mix attention kinds (``config.layer_types``: full and sliding-window).

    transformers picks each block's mask by its place in the block list, so such a model cannot run
    a block list cut at a later block."""
    return len(set(getattr(model.config, "layer_types", None) or ())) > 1


def resume_forward(model: nn.Module, arch: Architecture, inputs: Inputs, run: Resume) -> Any:
    prefix, layer, pos = run.prefix, run.layer, run.pos
    if layer and mixes_layer_types(model):
        raise ValueError(
            f"resume at block {layer}: this model's blocks mix attention kinds ({sorted(set(model.config.layer_types))}) "
            f"and transformers picks each block's mask by its place in the block list; resume at block 0"
        )
    rows = batch_size(inputs)
    if rows % prefix.rows:
        raise ValueError(
            f"a resumed batch of {rows} rows is not a whole number of copies of the prefix's {prefix.rows} rows"
        )
    times = rows // prefix.rows

    def tiled(t: torch.Tensor) -> torch.Tensor:
        return t.repeat(times, *([1] * (t.ndim - 1))) if times > 1 else t

    trimmed = {k: (v[:, pos:] if k in _POSITIONAL else v) for k, v in inputs.items()}
    extra: dict[str, Any] = {}
    if arch.causal:
        extra["use_cache"] = bool(pos)
    if pos:
        extra[_cache_argument(model)] = _prefix_cache(model, prefix, layer, pos, tiled)

    blocks = _blocks(model, arch)
    parent_path, _, name = arch.layers.rpartition(".")
    parent = submodule(model.base_model, parent_path, None)
    with temporarily() as changes:  # each undo registered before its change
        if not run.own_inputs:  # else the model embeds the rows' own tokens pos..
            start = tiled(prefix.residuals[layer][:, pos:])

            def inject(module, args, kwargs):
                if "hidden_states" in kwargs:
                    return args, {**kwargs, "hidden_states": start}
                return (start, *args[1:]), kwargs

            changes.forward_pre_hook(blocks[layer], inject, with_kwargs=True, prepend=True)
        if layer:
            changes.undo(lambda: setattr(parent, name, blocks))
            setattr(parent, name, nn.ModuleList(list(blocks)[layer:]))
        raw = model(**trimmed, **extra, return_dict=True)
    if pos:
        # The cache holds the prefix's keys and values (the prefix keeps them); the output need not.
        raw["cache" if raw.get("cache") is not None else "past_key_values"] = None
        field = _output_field(raw)
        raw[field] = _repeated_before(prefix.output[:, :pos].to(raw[field].dtype), raw[field], axis=1)
    return raw


def _prefix_cache(model: nn.Module, prefix: Prefix, layer: int, pos: int, tiled: Callable) -> Any:
    """A transformers cache of the prefix's keys and values of positions ``..pos``, for a run from ``(layer, pos)``.

    Plain and sliding-window blocks get entries holding the prefix untiled (views, so every block
    gets one at no cost: masks may be sized from any block's entry). Other layer types are filled,
    as transformers would, with the prefix tiled to the batch, for the blocks that run and block 0
    (whose entry tells the model how many positions came before).
    """
    from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

    plain, sliding = _prefix_layer_classes()
    cache = DynamicCache(config=model.config)
    for i, (keys, values) in enumerate(prefix.keys_values):
        keys, values = keys[:, :, :pos], values[:, :, :pos]
        kind = type(cache.layers[i])
        if kind is DynamicLayer:
            cache.layers[i] = plain(keys, values)
        elif kind is DynamicSlidingWindowLayer:
            cache.layers[i] = sliding(cache.layers[i].sliding_window, keys, values)
        elif i >= layer or i == 0:
            cache.update(tiled(keys), tiled(values), i)
    return cache


def _repeated_before(prefix: torch.Tensor, new: torch.Tensor, axis: int = -2) -> torch.Tensor:
    """``prefix`` repeated down ``new``'s rows, ``new`` after it along the sequence ``axis`` (keys and values:
    ``[rows, heads, pos, d]``; outputs: ``[rows, pos, ...]``).

    Built in one new tensor: the prefix is written into each repeat through a view, never tiled first.
    """
    rows, axis = new.shape[0], axis % new.ndim
    if rows % prefix.shape[0]:
        raise ValueError(f"{rows} rows are not a whole number of copies of the prefix's {prefix.shape[0]}")
    length = prefix.shape[axis]
    out = new.new_empty(*new.shape[:axis], length + new.shape[axis], *new.shape[axis + 1 :])
    out.view(rows // prefix.shape[0], *prefix.shape[:1], *out.shape[1:]).narrow(axis + 1, 0, length).copy_(
        prefix.expand(rows // prefix.shape[0], *prefix.shape)
    )
    out.narrow(axis, length, new.shape[axis]).copy_(new)
    return out


@functools.cache
def _prefix_layer_classes() -> tuple[type, type]:
    """The cache layers of a resumed run, for plain and for sliding-window blocks.

    Defined on first use so that importing crosspatch does not import transformers. Both hold the
    prefix's keys and values untiled; ``update`` returns them repeated to the batch with the new
    states after them but stores nothing, so a block's full keys and values live only while the
    block runs. ``get_seq_length`` and ``get_mask_sizes`` (hence positions and masks) are those of a
    layer filled with the prefix, also after the forward.
    """
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    class Untiled:
        def update(
            self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
        ) -> tuple[torch.Tensor, torch.Tensor]:
            return _repeated_before(self.keys, key_states), _repeated_before(self.values, value_states)

    class PrefixLayer(Untiled, DynamicLayer):
        def __init__(self, keys: torch.Tensor, values: torch.Tensor):
            super().__init__()
            self.lazy_initialization(keys, values)
            self.keys, self.values = keys, values

    class SlidingPrefixLayer(Untiled, DynamicSlidingWindowLayer):
        """Holds what a sliding-window layer filled with the prefix keeps: its last ``sliding_window - 1`` positions."""

        def __init__(self, sliding_window: int, keys: torch.Tensor, values: torch.Tensor):
            super().__init__(sliding_window)
            self.lazy_initialization(keys, values)
            self.keys = keys[:, :, -sliding_window + 1 :]
            self.values = values[:, :, -sliding_window + 1 :]
            self.cumulative_length = keys.shape[-2]

    return PrefixLayer, SlidingPrefixLayer
