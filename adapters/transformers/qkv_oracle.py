"""The query, key and value states a model hands transformers' attention function, read and replaced per
head: an oracle for ``head_in`` that knows nothing of how a fused projection orders its columns.

While :func:`handed_states` is active, the model's config (and its sub-configs) runs an attention function
of ours: for one attention module it hands the states ``[batch, heads, pos, d_head]`` to a callback, which
may return others, and every module then runs the implementation the config had (``sdpa``, a flash kernel,
or eager attention computed as transformers' eager attention computes it), with that implementation's masks.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import nn

from crosspatch.engine.reach import temporarily

from .reaches import _implementations, _pattern_attention, _set_implementation

__all__ = ["handed_states"]

States = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
_CALLBACKS: dict[int, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], States | None]] = {}


def _wrapping(inner: Callable | None) -> Callable:
    def attention(module, query, key, value, attention_mask, **kwargs):
        callback = _CALLBACKS.get(id(module))
        if callback is not None:
            new = callback(query, key, value)
            if new is not None:
                query, key, value = new
        return (inner or _pattern_attention)(module, query, key, value, attention_mask, **kwargs)

    return attention


def _register(implementation: str) -> str:
    """The name of our function wrapping ``implementation`` (registered once, with its masks)."""
    from transformers.masking_utils import AttentionMaskInterface, eager_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    name = f"crosspatch_states_{implementation}"
    if name not in AttentionInterface._global_mapping:
        inner = None if implementation == "eager" else ALL_ATTENTION_FUNCTIONS.get(implementation)
        AttentionInterface.register(name, _wrapping(inner))
        AttentionMaskInterface.register(name, AttentionMaskInterface._global_mapping.get(implementation, eager_mask))
    return name


@contextlib.contextmanager
def handed_states(model: nn.Module, module: nn.Module,
                  callback: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], States | None]) -> Iterator[None]:
    """For the block: ``callback(query, key, value)`` sees (and may replace) what ``module`` hands the attention
    function in each forward of ``model``. Undone when the block ends, also when it raises."""
    config = model.config
    with temporarily() as changes:
        before = _implementations(config)
        changes.undo(lambda: [_set_implementation(c, v) for c, v in before.values()])
        changes.undo(lambda: _CALLBACKS.pop(id(module), None))
        _CALLBACKS[id(module)] = callback
        for sub, value in before.values():
            current = getattr(sub, "_attn_implementation", None) or "eager"
            _set_implementation(sub, _register(current if isinstance(current, str) else "eager"))
        yield
