"""Reaches of the generic adapter: a field of a module's output, a module's first positional input.

Both count the module's calls in a run and raise :class:`SharedModuleError`, naming the module and
the site, when it runs a second time: a shared module's site would otherwise silently be its last
call. With ``copy`` (the probe saw the forward change the tensor in place later) they hand out a copy
and write back a copy, so neither a capture nor the value written changes behind the user's back.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from crosspatch.engine.reach import ModuleInput, ModuleOutput, installing, submodule
from crosspatch.sites.catalog import Callback, Handle
from crosspatch.sites.site import SiteError, site_key

from .errors import SharedModuleError
from .fields import FieldKey, get_field, replace_field

__all__ = ["FieldOutput", "AttributeOutput", "FirstInput"]


def _again(where: str, site: str, what: str) -> SharedModuleError:
    return SharedModuleError(
        f"site {site}: module {where or '(the root)'!r} ran a second time in this forward (a shared or reused "
        f"module), so the site does not name one {what}. The generic adapter serves modules that run once per "
        f"forward: give each use its own module, or write an adapter for this model (docs/plugins.md)"
    )


def _fresh(tensor: torch.Tensor, copy: bool) -> torch.Tensor:
    return tensor.clone() if copy else tensor


class _Visit:
    """One hooked activation in one run: refuses a second call, hands the value out, takes the write back."""

    def __init__(self, where: str, site: str, what: str, callback: Callback, copy: bool):
        self.where, self.site, self.what, self.callback, self.copy = where, site, what, callback, copy
        self.calls = 0

    def __call__(self, value: Any, found: str) -> torch.Tensor | None:
        self.calls += 1
        if self.calls > 1:
            raise _again(self.where, self.site, self.what)
        if not isinstance(value, torch.Tensor):
            raise SiteError(
                f"site {self.site}: {found} is a {type(value).__name__}, not a tensor; the model changed since "
                f"the generic adapter read its sites"
            )
        new = self.callback(_fresh(value, self.copy))
        return None if new is None else _fresh(new, self.copy)


class _Located:
    """The module a reach hooks (``root``, ``path`` with ``{layer}``), and the site it serves."""

    root: nn.Module
    path: str
    family: str
    copy: bool

    def module(self, layer: int | None) -> nn.Module:
        return submodule(self.root, self.path, layer)

    def _visit(self, layer: int | None, callback: Callback, what: str) -> _Visit:
        return _Visit(self.path.format(layer=layer), site_key(self.family, layer), what, callback, self.copy)


class _Output(_Located):
    """Hooks one field of a module's output (``index`` as in :class:`ModuleOutput`)."""

    index: FieldKey

    def install(self, layer: int | None, callback: Callback) -> list[Handle]:
        visit, key = self._visit(layer, callback, "output"), self.index

        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            new = visit(get_field(output, key), f"field {key!r} of the output of {visit.where!r}")
            return None if new is None else replace_field(output, key, new)

        module = self.module(layer)
        with installing() as changes:
            changes.forward_hook(module, hook)
            return changes.handles


class FieldOutput(_Output, ModuleOutput):
    """A module's output, or its field ``index`` read as ``output[index]`` (tuple, list, dict, ModelOutput)."""

    def __init__(self, root: nn.Module, path: str, index: FieldKey, *, family: str, copy: bool = False):
        ModuleOutput.__init__(self, root, path, index)  # type: ignore[arg-type]
        self.family, self.copy = family, copy


class AttributeOutput(_Output):
    """Field ``index`` of a plain dataclass a module returns (read as an attribute)."""

    def __init__(self, root: nn.Module, path: str, index: str, *, family: str, copy: bool = False):
        self.root, self.path, self.index, self.family, self.copy = root, path, index, family, copy


class FirstInput(_Located, ModuleInput):
    """A module's first positional input."""

    def __init__(self, root: nn.Module, path: str, *, family: str, copy: bool = False):
        ModuleInput.__init__(self, root, path, name=None, position=0)
        self.family, self.copy = family, copy

    def install(self, layer: int | None, callback: Callback) -> list[Handle]:
        visit = self._visit(layer, callback, "input")

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> Any:
            new = visit(args[0] if args else None, f"the first positional input of {visit.where or '(the root)'!r}")
            return None if new is None else ((new, *args[1:]), kwargs)

        module = self.module(layer)
        with installing() as changes:
            changes.forward_pre_hook(module, hook, with_kwargs=True)
            return changes.handles
