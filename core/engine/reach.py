"""How the engine reaches a site family inside a module tree.

A :class:`Reach` (the protocol is in :mod:`crosspatch.sites.catalog`, with the family it reaches) installs whatever hooks it needs for one layer of a family and calls back with
the activation in the family's layout ``[batch, *axes]``. The callback returns a replacement
(or ``None`` for "unchanged"); the reach writes it back where the model will read it.
Adapters build reaches; the engine only calls :meth:`Reach.install` and removes the handles.

An install is interrupt-safe when it registers the undo of each change before making the change:
:class:`Changes` does that (``with installing() as changes: changes.forward_hook(module, hook)``), so a
``KeyboardInterrupt`` at any line of an install, even inside torch's ``register_forward_hook``, leaves
nothing behind. Inside a run the engine also collects each undo the moment it is registered
(:func:`collect`), so none is lost between an install and the engine.

The reaches here are architecture-free: a module's output, a module's input.
Adapters add their own (per-head views, derived residual sites, attention patterns).
"""

from __future__ import annotations

import contextlib
import logging
from contextvars import ContextVar
from typing import Any, Callable, Iterable, Iterator, Protocol

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..sites.catalog import Callback, Handle, Reach

__all__ = [
    "Handle", "Callback", "Reach", "ModuleOutput", "ModuleInput", "SlotSink", "aliases", "attach_slot_sink",
    "slot_sink", "submodule", "Changes", "Undo", "Unhook", "installing", "temporarily", "collect", "collector", "remove_all",
    "hook_mark", "remove_hooks_since",
]

log = logging.getLogger(__name__)

def submodule(root: nn.Module, path: str, layer: int | None) -> nn.Module:
    """``root.get_submodule(path)`` with ``{layer}`` filled in; errors name the path."""
    name = path.format(layer=layer)
    if not name:
        return root
    try:
        return root.get_submodule(name)
    except AttributeError as err:
        raise LookupError(f"no submodule {name!r} in {type(root).__name__}: {err}") from None


# Which of a module's hook dicts a hook kind lives in: the hooks themselves first, then their flags.
_HOOK_DICTS = {
    "forward": ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called"),
    "forward_pre": ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs"),
}


class Undo:
    """A handle whose ``remove`` calls ``undo``, which must be safe to call again (an interrupted
    teardown runs every undo a second time)."""

    def __init__(self, undo: Callable[[], None]):
        self.undo = undo

    def remove(self) -> None:
        self.undo()


class Unhook:
    """Removes hook function ``hook`` from ``module``'s hooks of ``kind`` (``"forward"``, ``"forward_pre"``).

    It finds the hook by identity, so it can be registered before the hook is: an interrupt anywhere in
    torch's ``register_forward_hook`` (after the hook is in the module's dict, before the handle is
    returned) is undone as well. Removing twice, or a hook never registered, does nothing.
    """

    def __init__(self, module: nn.Module, hook: Callable, kind: str = "forward"):
        if kind not in _HOOK_DICTS:
            raise ValueError(f"hook kind {kind!r}: expected one of {sorted(_HOOK_DICTS)}")
        self.module, self.hook, self.kind = module, hook, kind

    def remove(self) -> None:
        names = _HOOK_DICTS[self.kind]
        hooks = getattr(self.module, names[0], None)
        if not hooks:
            return
        for key in [k for k, fn in hooks.items() if fn is self.hook]:
            for name in reversed(names):  # the hook itself last: an interrupted removal is found again
                getattr(self.module, name, {}).pop(key, None)


_RUN: ContextVar["list[Handle] | None"] = ContextVar("crosspatch_run_handles", default=None)


def collector() -> "list[Handle] | None":
    """The list the current run collects handles in (None outside a run)."""
    return _RUN.get()


def collect(handles: "list[Handle] | None") -> None:
    """From now on, every handle a :class:`Changes` registers is also appended to ``handles`` (the
    engine's run) the moment it is registered, before its change is made; None stops collecting.
    The engine sets it when a run starts and puts the previous one back when the run ends."""
    _RUN.set(handles)


def remove_all(handles: Iterable[Handle]) -> None:
    """Remove ``handles`` in reverse order. An interrupt (or an error) midway does not stop the teardown:
    every handle is tried once more (removals are idempotent), then the first error is raised."""
    handles = list(handles)
    try:
        for handle in reversed(handles):
            handle.remove()
    except BaseException:
        for handle in reversed(handles):
            try:
                handle.remove()
            except Exception:  # the first error is the one raised
                log.exception("removing a hook handle failed")
        raise


class Changes:
    """Changes to a model made one at a time, each with its undo registered before the change is made.

    ``forward_hook`` / ``forward_pre_hook`` register an :class:`Unhook` and then the hook; ``add`` takes
    any handle whose ``remove`` undoes what follows it (register it first, then change). ``handles``
    lists them in order. Made by :func:`installing` (undone if the block raises) or :func:`temporarily`
    (undone when the block ends).
    """

    def __init__(self) -> None:
        self.handles: list[Handle] = []

    def add(self, handle: Handle) -> Handle:
        self.handles.append(handle)
        run = _RUN.get()
        if run is not None:
            run.append(handle)
        return handle

    def undo(self, undo: Callable[[], None]) -> Handle:
        """Register ``undo`` (idempotent) before making the change it undoes."""
        return self.add(Undo(undo))

    def forward_hook(self, module: nn.Module, hook: Callable, **kwargs: Any) -> None:
        self.add(Unhook(module, hook, "forward"))
        module.register_forward_hook(hook, **kwargs)

    def forward_pre_hook(self, module: nn.Module, hook: Callable, **kwargs: Any) -> None:
        self.add(Unhook(module, hook, "forward_pre"))
        module.register_forward_pre_hook(hook, **kwargs)

    def install(self, reach: Reach, layer: int | None, callback: Callback) -> None:
        """``reach`` installed at ``layer`` as part of these changes: each undo its install registers joins them
        before its change is made (as in an engine run), so an interrupt anywhere loses none."""
        previous = _RUN.get()
        try:
            _RUN.set(self.handles)
            start = len(self.handles)
            self.handles[start:] = reach.install(layer, callback)
        finally:
            _RUN.set(previous)

    def remove(self) -> None:
        remove_all(self.handles)


@contextlib.contextmanager
def installing() -> Iterator[Changes]:
    """The changes of one install: all of them stay when the block completes, none when it raises
    (``KeyboardInterrupt`` included). ``return changes.handles`` inside the block."""
    changes = Changes()
    try:
        yield changes
    except BaseException:
        changes.remove()
        raise


@contextlib.contextmanager
def temporarily() -> Iterator[Changes]:
    """Changes that last for the block: undone when it ends, also when it raises."""
    changes = Changes()
    try:
        yield changes
        changes.remove()
    except BaseException:  # also an interrupt that lands in the removal above, before it started removing
        changes.remove()
        raise


def hook_mark() -> int:
    """A mark in torch's hook numbering: every hook registered after it has an id at least this."""
    return RemovableHandle.next_id


def remove_hooks_since(root: nn.Module, mark: int) -> int:
    """Remove every forward and forward-pre hook registered on ``root``'s modules since :func:`hook_mark`
    returned ``mark``; return how many were removed (the engine's net when a run fails)."""
    removed = 0
    for module in root.modules():
        for names in _HOOK_DICTS.values():
            for name in reversed(names):  # the flags too, also of a hook whose removal was interrupted
                table = getattr(module, name, None) or {}
                for key in [k for k in table if isinstance(k, int) and k >= mark]:
                    del table[key]
                    removed += name == names[0]
    return removed


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
    further upstream). Edge attribution uses it to score edges as the backward produces them. A sink
    with ``takes_row_blocks = True`` is instead called once per block of rows, with ``row`` a
    ``slice(i0, i1)`` and gradients ``[roles, heads, rows, pos - start, d]`` (fewer, larger matmuls).
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

        module = submodule(self.root, self.path, layer)
        with installing() as changes:
            changes.forward_hook(module, hook)
            return changes.handles


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
        with installing() as changes:
            changes.forward_pre_hook(module, hook, with_kwargs=True)
            return changes.handles
