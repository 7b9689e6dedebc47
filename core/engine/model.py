"""A model wrapped with its adapter: the object users run, capture and intervene on."""

from __future__ import annotations

import warnings
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from .adapter import Adapter, AdapterError, Inputs, model_device
from .cache import Cache
from ..sites.catalog import Catalog
from .forward import Bound, Run, execute
from .interventions import Intervention
from ..sites.site import Site

__all__ = ["FallbackWarning", "WrappedModel", "wrap", "find_adapter"]

class WrappedModel:
    """A model plus the adapter that maps its internals onto sites.

    The wrapped module is used as it is: nothing is copied or changed, and hooks exist only
    while a run is under way.
    """

    def __init__(self, module: nn.Module, adapter: Adapter):
        self.module = module
        self.adapter = adapter
        self.catalog: Catalog = adapter.catalog(module)  # built now, so an unsupported model fails at wrap()
        self._capture_keys: dict[tuple, list[str]] = {}

    def sites(self) -> Catalog:
        """Every site family with its axes and sizes (print it for a table)."""
        return self.catalog

    @property
    def device(self) -> torch.device:
        return model_device(self.module)

    @property
    def dtype(self) -> torch.dtype:
        for p in self.module.parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.get_default_dtype()

    def prepare(self, inputs: Any) -> Inputs:
        """The adapter's normalised inputs (a dict of tensors on the model's device)."""
        return self.adapter.prepare(self.module, inputs)

    def capture_keys(self, sites: "str | Site | Iterable[str | Site]", inputs: Inputs | None = None) -> list[str]:
        """The family-and-layer keys a list of site patterns needs captured."""
        if isinstance(sites, (str, Site)):
            sites = [sites]
        sizes = self.adapter.sizes(inputs) if inputs is not None else {}
        memo = (tuple(sites), tuple(sorted(sizes.items())))  # the same patterns on inputs of the same sizes
        if memo not in self._capture_keys:
            keys: dict[str, None] = {}
            for pattern in sites:
                site = self.catalog.resolve(pattern, sizes)
                for concrete in self.catalog.expand(Site(site.family, site.layer), sizes).sites:
                    keys[concrete.key] = None
            self._capture_keys[memo] = list(keys)
        return list(self._capture_keys[memo])

    def run(
        self,
        inputs: Any,
        interventions: Any = None,
        *,
        capture: "str | Site | Iterable[str | Site]" = (),
        grad: bool = False,
    ) -> Run:
        """One forward on ``inputs`` with ``interventions`` applied and ``capture`` sites stored.

        ``interventions`` maps sites to interventions (``{"head_out.1[head=2]": Patch(cache)}``),
        or is a list of :class:`Bound` for interventions on chosen rows of the batch.
        """
        prepared = self.prepare(inputs)
        return execute(
            self.module,
            self.adapter,
            self.catalog,
            prepared,
            _bounds(interventions),
            self.capture_keys(capture, prepared) if capture else (),
            grad=grad,
        )

    def capture(self, inputs: Any, sites: "str | Site | Iterable[str | Site]", *, grad: bool = False) -> Cache:
        """The activations at ``sites`` (full family-and-layer tensors) for ``inputs``."""
        return self.run(inputs, capture=sites, grad=grad).cache

    def describe(self) -> dict[str, Any]:
        return {**self.adapter.describe(self.module), "adapter": self.adapter.name}

    def __repr__(self) -> str:
        return f"WrappedModel({type(self.module).__name__}, adapter={self.adapter.name!r}, {len(self.catalog)} site families)"


def _bounds(interventions: Any) -> list[Bound]:
    if not interventions:
        return []
    if isinstance(interventions, Mapping):
        items: Iterable = interventions.items()
    else:
        items = interventions
    out = []
    for item in items:
        if isinstance(item, Bound):
            out.append(item)
            continue
        site, intervention = item
        if not isinstance(intervention, Intervention):
            raise TypeError(f"site {site}: expected an Intervention (Patch, Zero, ...), got {type(intervention).__name__}")
        out.append(Bound(Site.parse(site), intervention))
    return out


def find_adapter(model: nn.Module, adapter: "str | Adapter | None" = None) -> Adapter:
    """The adapter for ``model``: the one named, or the first registered one that matches.

    Adapters marked ``fallback`` (serving any module) are asked last, in plugin order among themselves.
    """
    from ..plugins.registry import get_registry

    if isinstance(adapter, Adapter):
        return adapter
    adapters = get_registry().adapters()
    if isinstance(adapter, str):
        for candidate in adapters:
            if candidate.name == adapter:
                return candidate
        raise AdapterError(
            f"no adapter named {adapter!r}; installed: {', '.join(a.name for a in adapters) or 'none'} "
            f"(`crosspatch plugins` lists them)"
        )
    for candidate in sorted(adapters, key=lambda a: bool(getattr(a, "fallback", False))):  # stable
        if candidate.matches(model):
            return candidate
    cls = type(model)
    raise AdapterError(
        f"no crosspatch adapter serves {cls.__module__}.{cls.__qualname__}; installed adapters: "
        f"{', '.join(a.name for a in adapters) or 'none'}. To add an architecture, write an Adapter and register "
        f"it with the `register_adapters` hook in a plugin (entry-point group 'crosspatch')."
    )


def wrap(model: nn.Module, adapter: "str | Adapter | None" = None) -> WrappedModel:
    """Wrap ``model`` with the adapter the plugin registry finds for it (or the one named).

    When the adapter found (not named) matches the model but cannot serve it, a ``fallback`` adapter
    serves it instead, with a warning that says why the first one could not.
    """
    if isinstance(model, WrappedModel):
        return model
    if not isinstance(model, nn.Module):
        raise TypeError(f"wrap expects a torch.nn.Module, got {type(model).__name__}")
    found = find_adapter(model, adapter)
    try:
        return WrappedModel(model, found)
    except AdapterError as exc:
        fallback = None if adapter is not None or getattr(found, "fallback", False) else _fallback(model)
        if fallback is None:
            raise
        warnings.warn(f"{exc} -- serving it with the {fallback.name!r} adapter instead", FallbackWarning, stacklevel=2)
        return WrappedModel(model, fallback)


class FallbackWarning(UserWarning):
    """The adapter meant for a model could not serve it; a fallback adapter does."""


def _fallback(model: nn.Module) -> Adapter | None:
    from ..plugins.registry import get_registry

    return next((a for a in get_registry().adapters() if getattr(a, "fallback", False) and a.matches(model)), None)
