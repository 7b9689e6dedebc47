"""Prefix reuse for transformers models (see :mod:`crosspatch.resume`).

Keeping a prefix runs the model once with a pre-hook on every block that records the residual
entering it, and, in causal models, with the key/value cache on. Resuming at block ``L`` runs
transformers' own forward with the block list cut to ``L..`` (restored afterwards) and the
recorded residual put in place of the embeddings at block ``L``; resuming at position ``p``
also passes only tokens ``p..`` with the recorded keys and values of tokens ``..p`` as the cache,
so masks, positions and rotary embeddings are whatever transformers computes for a cached run.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from crosspatch.adapter import Inputs, batch_size
from crosspatch.reach import submodule
from crosspatch.resume import Prefix, Resume

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

    handles = [block.register_forward_pre_hook(recorder(i), with_kwargs=True) for i, block in enumerate(blocks)]
    try:
        extra = {"use_cache": True} if arch.causal else {}
        raw = model(**inputs, **extra, return_dict=True)
    finally:
        for handle in handles:
            handle.remove()
    keys_values = []
    if arch.causal:
        field = "cache" if raw.get("cache") is not None else "past_key_values"
        keys_values = [(layer.keys.detach(), layer.values.detach()) for layer in raw[field].layers]
        raw[field] = None  # the prefix holds them; the output need not
    output = raw[_output_field(raw)]
    length = output.shape[1]
    prefix = Prefix(residuals, output.detach(), arch.causal, keys_values, length)  # type: ignore[arg-type]
    return raw, prefix


def resume_forward(model: nn.Module, arch: Architecture, inputs: Inputs, run: Resume) -> Any:
    prefix, layer, pos = run.prefix, run.layer, run.pos
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
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config)
        for i, (keys, values) in enumerate(prefix.keys_values):
            # Blocks before `layer` do not run; block 0's entry still tells the model how many positions came before.
            if i >= layer or i == 0:
                cache.update(tiled(keys[:, :, :pos]), tiled(values[:, :, :pos]), i)
        extra[_cache_argument(model)] = cache

    blocks = _blocks(model, arch)
    start = tiled(prefix.residuals[layer][:, pos:])

    def inject(module, args, kwargs):
        if "hidden_states" in kwargs:
            return args, {**kwargs, "hidden_states": start}
        return (start, *args[1:]), kwargs

    handle = blocks[layer].register_forward_pre_hook(inject, with_kwargs=True, prepend=True)
    parent_path, _, name = arch.layers.rpartition(".")
    parent = submodule(model.base_model, parent_path, None)
    try:
        if layer:
            setattr(parent, name, nn.ModuleList(list(blocks)[layer:]))
        raw = model(**trimmed, **extra, return_dict=True)
    finally:
        setattr(parent, name, blocks)
        handle.remove()
    if pos:  # the prefix's positions, copied into each repeat of the rows without a tiled copy first
        field = _output_field(raw)
        tail = raw[field]
        out = tail.new_empty(rows, pos + tail.shape[1], *tail.shape[2:])
        out.view(times, prefix.rows, *out.shape[1:])[:, :, :pos] = prefix.output[:, :pos].to(tail.dtype)
        out[:, pos:] = tail
        raw[field] = out
    return raw
