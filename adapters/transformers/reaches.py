"""Reaches specific to transformer blocks: per-head writes, the mid-block residual, branch writes that
include the residual, attention patterns."""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from crosspatch.engine.offload import onloaded, reads_weights
from crosspatch.engine.reach import Callback, Handle, installing, submodule


class HeadOut:
    """Each head's write into the residual, ``[batch, pos, head, d_model]``, read at the output projection.

    The projection's input holds the heads side by side; head ``h``'s write is its slice times
    its rows of the weight. The per-head writes plus the bias sum to the projection's output.
    A new value is written back as ``output + sum_h(new_h - old_h)``, so unchanged heads change nothing.
    """

    def __init__(self, root: nn.Module, path: str, n_heads: int, conv1d: bool):
        self.root, self.path, self.n_heads, self.conv1d = root, path, n_heads, conv1d

    def _per_head(self, module: nn.Module) -> torch.Tensor:
        """The projection's weight as ``[head, d_head, d_model]``."""
        weight = module.weight if self.conv1d else module.weight.T  # [n_heads * d_head, d_model]
        return weight.reshape(self.n_heads, -1, weight.shape[-1])

    def writes(self, z: torch.Tensor, layer: int | None) -> torch.Tensor:
        """Every head's write ``[batch, pos, head, d_model]`` from ``head_z`` ``[batch, pos, head, d_head]``
        (no graph: for differences of captured values)."""
        module = submodule(self.root, self.path, layer)
        with onloaded(module), torch.no_grad():
            return torch.einsum("bphe,hed->bphd", z, self._per_head(module).to(z.device, z.dtype))

    def install(self, layer: int | None, callback: Callback) -> list[Handle]:
        n_heads = self.n_heads

        def hook(module, args, output):
            z = args[0].to(output.device)
            z = z.reshape(*z.shape[:-1], n_heads, z.shape[-1] // n_heads)
            heads = torch.einsum("bphe,hed->bphd", z, self._per_head(module))
            new = callback(heads)
            if new is None:
                return None
            return output + (new - heads).sum(dim=2)

        module = submodule(self.root, self.path, layer)
        with installing() as changes:
            changes.forward_hook(module, reads_weights(hook))
            return changes.handles


class HeadZ:
    """Each head's slice of the output projection's input, ``[batch, pos, head, d_head]``: the head's
    attention-weighted values before the projection (TransformerLens's ``hook_z``)."""

    def __init__(self, root: nn.Module, path: str, n_heads: int):
        self.root, self.path, self.n_heads = root, path, n_heads

    def install(self, layer: int | None, callback: Callback) -> list[Handle]:
        n_heads = self.n_heads

        def hook(module, args):
            z = args[0]
            new = callback(z.unflatten(-1, (n_heads, z.shape[-1] // n_heads)))
            if new is None:
                return None
            return (new.flatten(-2).to(z.dtype), *args[1:])

        module = submodule(self.root, self.path, layer)
        with installing() as changes:
            changes.forward_pre_hook(module, hook)
            return changes.handles


class ResidualAfterAttention:
    """``resid_mid`` of a pre-LN block: block input + attention output.

    Written by shifting the attention output by ``new - old``, so that both the residual branch and
    the MLP's layer norm see the new value.
    """

    def __init__(self, root: nn.Module, block: str, attn: str):
        self.root, self.block, self.attn = root, block, attn

    def install(self, layer: int | None, callback: Callback) -> list[Handle]:
        stash: dict[str, torch.Tensor] = {}

        def before_block(module, args, kwargs):
            stash["x"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

        def after_attention(module, args, output):
            a = output if isinstance(output, torch.Tensor) else output[0]
            resid = a + stash.pop("x").to(a.device)
            new = callback(resid)
            if new is None:
                return None
            shifted = a + (new - resid)
            return shifted if isinstance(output, torch.Tensor) else (shifted, *output[1:])

        block = submodule(self.root, self.block, layer)
        attn = submodule(self.root, self.attn, layer)
        with installing() as changes:
            changes.forward_pre_hook(block, before_block, with_kwargs=True)
            changes.forward_hook(attn, after_attention)
            return changes.handles


class BranchWrite:
    """The write of a branch module that adds the residual it is handed to its own output (BLOOM's
    attention and MLP take it as argument ``residual``): read as ``output - residual``, written back as
    ``output + (new - write)``, that is ``residual + new`` (an unchanged write changes nothing)."""

    def __init__(self, root: nn.Module, path: str, residual: str):
        self.root, self.path, self.residual = root, path, residual

    def install(self, layer: int | None, callback: Callback) -> list[Handle]:
        module = submodule(self.root, self.path, layer)
        name, position = self.residual, _position(module, self.residual)

        def hook(module, args, kwargs, output):
            if name in kwargs:
                residual = kwargs[name]
            elif position is not None and position < len(args):
                residual = args[position]
            else:
                raise RuntimeError(f"{type(module).__name__} was called without its residual argument {name!r}")
            y = output if isinstance(output, torch.Tensor) else output[0]
            write = y - residual.to(y.device)
            new = callback(write)
            if new is None:
                return None
            shifted = y + (new - write)
            return shifted if isinstance(output, torch.Tensor) else (shifted, *output[1:])

        with installing() as changes:
            changes.forward_hook(module, hook, with_kwargs=True)
            return changes.handles


def _position(module: nn.Module, name: str) -> int | None:
    """Where argument ``name`` of ``module.forward`` goes when passed by position."""
    params = list(inspect.signature(module.forward).parameters.values())
    for i, p in enumerate(params):
        if p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            return None
        if p.name == name:
            return i
    return None


# Attention patterns live inside transformers' attention function, where no module boundary exists.
# While a run reads or writes them, the model's attention implementation is switched to an eager
# function of ours that calls back with the pattern; the switch is undone when the run ends.
_IMPLEMENTATION = "crosspatch_eager"
_ACTIVE: dict[int, Callback] = {}  # id(attention module) -> the callback of the run's pattern site there
_SWITCHED: dict[int, "_Switch"] = {}  # id(config) -> the switch of that config, while a handle uses it


def _pattern_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None, s_aux=None, **kwargs):
    """transformers' eager attention, calling back with the pattern: logit soft-capping (Gemma 2) and
    attention sinks (``s_aux``, one extra logit per head dropped after the softmax) as transformers does."""
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # grouped-query attention: each key/value head serves `groups` query heads
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        scores = scores + attention_mask[..., : key.shape[-2]]
    wide = torch.float32 if query.dtype in (torch.float16, torch.bfloat16) else query.dtype
    if s_aux is not None:
        sinks = s_aux.reshape(1, -1, 1, 1).expand(*scores.shape[:-1], 1).to(scores.dtype)
        combined = torch.cat([scores, sinks], dim=-1)
        combined = combined - combined.max(dim=-1, keepdim=True).values
        pattern = F.softmax(combined, dim=-1, dtype=wide)[..., :-1].to(query.dtype)
    else:
        pattern = F.softmax(scores, dim=-1, dtype=wide).to(query.dtype)
    callback = _ACTIVE.get(id(module))
    if callback is not None:
        new = callback(pattern)
        if new is not None:
            pattern = new
    pattern = F.dropout(pattern, p=dropout, training=module.training)
    out = torch.matmul(pattern, value).transpose(1, 2).contiguous()
    return out, pattern


def _register_implementation() -> None:
    from transformers.masking_utils import AttentionMaskInterface, eager_mask
    from transformers.modeling_utils import AttentionInterface

    if _IMPLEMENTATION not in AttentionInterface._global_mapping:
        AttentionInterface.register(_IMPLEMENTATION, _pattern_attention)
        AttentionMaskInterface.register(_IMPLEMENTATION, eager_mask)


def _implementations(config) -> dict[int, tuple[Any, Any]]:
    """The attention implementation of ``config`` and of its sub-configs (transformers' setter switches
    those too), as stored: ``{id: (config, value)}``."""
    found: dict[int, tuple[Any, Any]] = {}
    stack = [config]
    while stack:
        c = stack.pop()
        if c is None or id(c) in found or not hasattr(c, "_attn_implementation"):
            continue
        found[id(c)] = (c, getattr(c, "_attn_implementation_internal", c._attn_implementation))
        stack.extend(getattr(c, key, None) for key in getattr(c, "sub_configs", None) or ())
    return found


def _set_implementation(config, value) -> None:
    if hasattr(config, "_attn_implementation_internal"):  # as stored: no propagation to sub-configs
        config._attn_implementation_internal = value
    else:
        config._attn_implementation = value


class _Switch:
    """One config switched to crosspatch's attention: what it and its sub-configs held before, and the
    handles using it. The last handle removed puts every value back."""

    def __init__(self, config):
        self.config, self.before, self.users = config, _implementations(config), set()

    def restore(self) -> None:
        for config, value in self.before.values():
            _set_implementation(config, value)


class _PatternHandle:
    """Undoes one pattern install: the callback, then (when no other handle uses it) the switch. Made,
    and registered with the run, before either change; removing it twice, or before it took effect,
    is harmless."""

    def __init__(self, module: nn.Module, config, callback: Callback):
        self.module_id, self.config_id, self.callback = id(module), id(config), callback

    def remove(self) -> None:
        if _ACTIVE.get(self.module_id) is self.callback:
            del _ACTIVE[self.module_id]
        switch = _SWITCHED.get(self.config_id)
        if switch is None:
            return
        switch.users.discard(self)
        if not switch.users:
            switch.restore()
            _SWITCHED.pop(self.config_id, None)


class AttentionPattern:
    """Attention patterns ``[batch, head, pos, key_pos]`` after the softmax, before dropout.

    Reading or writing them switches ``config``'s attention implementation (and its sub-configs') to
    crosspatch's eager attention for the run only: the last handle removed restores what each held.
    """

    def __init__(self, root: nn.Module, path: str, config):
        self.root, self.path, self.config = root, path, config

    def implementation(self) -> str:
        """The name of the attention function the config is switched to while the pattern is hooked."""
        return _IMPLEMENTATION

    def install(self, layer: int | None, callback: Callback) -> list[Handle]:
        _register_implementation()
        module = submodule(self.root, self.path, layer)
        config, implementation = self.config, self.implementation()
        with installing() as changes:
            handle = changes.add(_PatternHandle(module, config, callback))
            _ACTIVE[id(module)] = callback
            switch = _SWITCHED.get(id(config)) or _SWITCHED.setdefault(id(config), _Switch(config))
            switch.users.add(handle)
            for sub, _ in switch.before.values():  # the config and its sub-configs, as transformers' setter does
                _set_implementation(sub, implementation)
            return changes.handles
