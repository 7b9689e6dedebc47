"""How the engine reaches a site family inside a module tree.

A :class:`Reach` (the protocol is in :mod:`crosspatch.sites.catalog`, with the family it reaches) installs whatever hooks it needs for one layer of a family and calls back with
the activation in the family's layout ``[batch, *axes]``. The callback returns a replacement
(or ``None`` for "unchanged"); the reach writes it back where the model will read it.
Adapters build reaches; the engine only calls :meth:`Reach.install` and removes the handles.

The reaches here are architecture-free: a module's output, a module's input.
Adapters add their own (per-head views, derived residual sites, attention patterns).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn

from ..sites.catalog import Callback, Handle, Reach

__all__ = ["Handle", "Callback", "Reach", "ModuleOutput", "ModuleInput", "SlotSink", "aliases", "attach_slot_sink", "slot_sink", "submodule"]

def submodule(root: nn.Module, path: str, layer: int | None) -> nn.Module:
    """``root.get_submodule(path)`` with ``{layer}`` filled in; errors name the path."""
    name = path.format(layer=layer)
    if not name:
        return root
    try:
        return root.get_submodule(name)
    except AttributeError as err:
        raise LookupError(f"no submodule {name!r} in {type(root).__name__}: {err}") from None


def aliases(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` is ``b`` or a view of exactly its elements (same storage, offset, sizes and strides)."""
    if a is b:
        return True
    if (a.dtype, a.device, a.shape, a.stride(), a.is_neg()) != (b.dtype, b.device, b.shape, b.stride(), b.is_neg()):
        return False
    ptr = a.untyped_storage().data_ptr()  # 0 without memory (meta, empty): not known to alias
    return ptr != 0 and ptr == b.untyped_storage().data_ptr() and a.storage_offset() == b.storage_offset()


class SlotSink(Protocol):
    """Takes the per-slot gradients of a tap on a family of per-slot inputs (``head_in``: one slot per
    role and head) row by row, instead of as the tap's gradient.

    A reach that computes per-slot gradients (the transformers adapter's ``head_in``) and finds a sink
    on the value handed back to it (:func:`slot_sink`) calls it once per batch row with the gradients
    ``[roles, heads, pos - start, d]`` of that row's positions ``start..``, never writing all slots'
    gradients at once; the tap's own gradient is then only right summed over the slots (what flows
    further upstream). Edge attribution uses it to score edges as the backward produces them.
    """

    start: int

    def __call__(self, row: int, grads: torch.Tensor, first_role: int, head_step: int) -> None:
        """``grads`` are those of roles ``first_role..`` and heads ``0, head_step, 2 * head_step, ..``."""


_SLOT_SINK = "_crosspatch_slot_sink"


def attach_slot_sink(value: torch.Tensor, sink: SlotSink) -> torch.Tensor:
    """``value`` (a tap's value, handed back to the reach as it is) carrying ``sink``."""
    setattr(value, _SLOT_SINK, sink)
    return value


def slot_sink(value: torch.Tensor | None) -> SlotSink | None:
    """The sink a value handed back to a reach carries, if any."""
    return getattr(value, _SLOT_SINK, None)


def _replace_first(output: Any, index: int, new: torch.Tensor) -> Any:
    if isinstance(output, torch.Tensor):
        return new
    items = list(output)
    items[index] = new
    return type(output)(items) if isinstance(output, tuple) else items


class ModuleOutput:
    """The output of a module (element ``index`` when it returns a tuple)."""

    def __init__(self, root: nn.Module, path: str, index: int = 0):
        self.root, self.path, self.index = root, path, index

    def install(self, layer: int | None, callback: Callback) -> list[Handle]:
        index = self.index

        def hook(module, args, output):
            value = output if isinstance(output, torch.Tensor) else output[index]
            new = callback(value)
            return None if new is None else _replace_first(output, index, new)

        return [submodule(self.root, self.path, layer).register_forward_hook(hook)]


class ModuleInput:
    """An input of a module: keyword ``name`` when passed by keyword, else positional ``position``."""

    def __init__(self, root: nn.Module, path: str, name: str | None = "hidden_states", position: int = 0):
        self.root, self.path, self.name, self.position = root, path, name, position

    def install(self, layer: int | None, callback: Callback) -> list[Handle]:
        name, position = self.name, self.position

        def hook(module, args, kwargs):
            if name is not None and name in kwargs:
                new = callback(kwargs[name])
                if new is None:
                    return None
                return args, {**kwargs, name: new}
            if len(args) <= position:
                raise RuntimeError(
                    f"{type(module).__name__} was called without input {name or position!r}; "
                    f"the adapter's reach for it is wrong"
                )
            new = callback(args[position])
            if new is None:
                return None
            return args[:position] + (new,) + args[position + 1 :], kwargs

        module = submodule(self.root, self.path, layer)
        return [module.register_forward_pre_hook(hook, with_kwargs=True)]
