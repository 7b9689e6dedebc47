"""A model wrapped with its adapter: the object users run, capture and intervene on.

It also holds the model's tokenizer when one is known, so text goes in wherever inputs do
(``m.capture("When Mary and John ...", ...)``, ``activation_patching(m, "clean", "corrupt", ...)``),
and makes sure the model runs in eval mode: dropout would make identical runs differ.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import sys
import warnings
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn

from .adapter import Adapter, AdapterError, Inputs, model_device
from .cache import Cache
from ..sites.catalog import Catalog
from .forward import Bound, Run, execute
from .interventions import Fn, Intervention
from . import text
from ..sites.site import Site

__all__ = ["FallbackWarning", "TrainingModeWarning", "WrappedModel", "wrap", "find_adapter"]

Sites = "str | Site | Iterable[str | Site]"


class WrappedModel:
    """A model plus the adapter that maps its internals onto sites, and its tokenizer (or None).

    The wrapped module is used as it is: nothing is copied, and hooks exist only while a run is
    under way. :func:`wrap` puts a model in training mode into eval mode (``train_ok`` keeps it).
    """

    def __init__(self, module: nn.Module, adapter: Adapter, tokenizer: Any = None, train_ok: bool = False):
        self.module = module
        self.adapter = adapter
        self.tokenizer = tokenizer
        self.train_ok = train_ok
        self.no_tokenizer: str | None = None  # why a model loaded by name has no tokenizer, for errors
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
        """The adapter's normalised inputs (a dict of tensors on the model's device). A string or a list
        of strings is tokenized first with the model's tokenizer (:meth:`tokens`)."""
        if text.is_text(inputs):
            inputs = self._encode(inputs)
        return self.adapter.prepare(self.module, inputs)

    # -- text ------------------------------------------------------------------------------

    def tokens(self, texts: "str | Sequence[str]") -> torch.Tensor:
        """Token ids ``[batch, pos]`` (on the CPU) of one text or a list of them, as runs read them: with the
        tokenizer's special tokens, padded (on its ``padding_side``) when the texts differ in length."""
        return self._encode(texts)["input_ids"]

    def to_str_tokens(self, inputs: Any) -> "list[str] | list[list[str]]":
        """Each token as text: a list for one text (or a 1-D row of ids), a list of lists for several."""
        if isinstance(inputs, str):
            return text.str_tokens(self._tokenizer(), self.tokens(inputs)[0].tolist())
        if text.is_text(inputs):
            return [self.to_str_tokens(t) for t in inputs]  # type: ignore[misc]
        ids = torch.as_tensor(inputs["input_ids"] if isinstance(inputs, Mapping) else inputs)
        if ids.ndim == 1:
            return text.str_tokens(self._tokenizer(), ids.tolist())
        return [text.str_tokens(self._tokenizer(), row.tolist()) for row in ids]

    def token_id(self, answer: str, what: str = "answer") -> int:
        """The one token id of ``answer`` (no special tokens), or a TokenizationError showing its tokens;
        what a metric's text answers are resolved with (``metric.resolve(m.token_id)``)."""
        return text.single_token(self._tokenizer(), answer, what)

    def position_labels(self, inputs: Inputs) -> list[str] | None:
        """``"3 John"``-style labels of the positions of prepared ``inputs`` (the first prompt's tokens), or
        None without a tokenizer or token ids."""
        ids = inputs.get("input_ids") if isinstance(inputs, Mapping) else None
        if self.tokenizer is None or not isinstance(ids, torch.Tensor) or ids.ndim != 2 or ids.is_floating_point():
            return None
        try:
            return text.position_labels(self.tokenizer, ids[0].tolist())
        except Exception:  # a tokenizer that cannot decode: plain indices will do
            return None

    def _tokenizer(self) -> Any:
        if self.tokenizer is None:
            if self.no_tokenizer:
                raise text.TokenizationError(
                    f"{type(self.module).__name__} has no tokenizer, so it cannot take text: {self.no_tokenizer}; "
                    f"or wrap it with one, cp.wrap(model, tokenizer=tok), or pass token ids"
                )
            raise text.TokenizationError(
                f"{type(self.module).__name__} has no tokenizer, so it cannot take text: wrap it with one, "
                f"cp.wrap(model, tokenizer=tok) (a zoo model or a checkpoint folder brings its own: "
                f"cp.wrap('ioi-gpt2-tiny')), or pass token ids"
            )
        return self.tokenizer

    def _encode(self, texts: "str | Sequence[str]") -> Inputs:
        return text.encode_batch(self._tokenizer(), texts)

    # -- runs ------------------------------------------------------------------------------

    def capture_keys(self, sites: Sites, inputs: Inputs | None = None) -> list[str]:
        """The family-and-layer keys a list of site patterns needs captured."""
        sites = _site_list(sites)
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
        capture: Sites = (),
        grad: bool = False,
    ) -> Run:
        """One forward on ``inputs`` with ``interventions`` applied and ``capture`` sites stored.

        ``interventions`` maps sites to interventions (``{"head_out.1[head=2]": Patch(cache)}``; a plain
        function ``x -> new x`` is an :class:`Fn`), or is a list of :class:`Bound` for interventions on
        chosen rows of the batch. Inputs (and an intervention's source inputs) may be text. Sites may
        select positions by a group the inputs carry (``resid_pre.1[pos=image]``), and the list may hold
        :class:`~crosspatch.engine.knockout.Knockout` items (:func:`~crosspatch.engine.knockout.bind`).
        """
        prepared = self.prepare(inputs)
        capture = _site_list(capture)
        return execute(
            self.module,
            self.adapter,
            self.catalog,
            prepared,
            [self._tokenized_source(b) for b in _bounds(interventions, self, prepared)],
            self.capture_keys(capture, prepared) if capture else (),
            grad=grad,
        )

    def _tokenized_source(self, bound: Bound) -> Bound:
        """``bound`` with an intervention whose source inputs are text given token ids instead (a copy)."""
        source = bound.intervention.source_inputs
        if not text.is_text(source):
            return bound
        iv = bound.intervention
        names = [f.name for f in dataclasses.fields(iv)] if dataclasses.is_dataclass(iv) else list(vars(iv))
        name = next((n for n in names if getattr(iv, n, None) is source), None)
        if name is None:  # cannot tell where the source lives: the engine reports text it cannot run
            return bound
        iv = copy.copy(iv)
        setattr(iv, name, self._encode(source))
        return Bound(bound.site, iv, bound.rows)

    def capture(self, inputs: Any, sites: Sites, *, grad: bool = False) -> Cache:
        """The activations at ``sites`` (full family-and-layer tensors) for ``inputs``."""
        return self.run(inputs, capture=sites, grad=grad).cache

    def describe(self) -> dict[str, Any]:
        return {**self.adapter.describe(self.module), "adapter": self.adapter.name}

    def __repr__(self) -> str:
        tok = ", with a tokenizer" if self.tokenizer is not None else ""
        return (
            f"WrappedModel({type(self.module).__name__}, adapter={self.adapter.name!r}, "
            f"{len(self.catalog)} site families{tok})"
        )


def _site_list(sites: Any) -> list:
    """Site patterns as a list, read once (a generator is consumed here, not by a memo key); anything
    but a site, a pattern string or an iterable of them is refused."""
    if isinstance(sites, (str, Site)):
        return [sites]
    if sites is None:
        return []
    try:
        items = list(sites)
    except TypeError:
        raise TypeError(
            f"sites must be a site pattern string, a Site, or an iterable of them; got {type(sites).__name__} {sites!r}"
        ) from None
    bad = [s for s in items if not isinstance(s, (str, Site))]
    if bad:
        raise TypeError(
            f"sites must be site pattern strings or Sites; got {type(bad[0]).__name__} {bad[0]!r} among them "
            f"(a list of lists? give one flat list)"
        )
    return items


def _bounds(interventions: Any, model: "WrappedModel", prepared: Inputs) -> list[Bound]:
    """Bound interventions; position groups and knockouts resolved against the prepared inputs."""
    if not interventions:
        return []
    from .knockout import bind

    return [b if isinstance(b.intervention, Intervention) else Bound(b.site, _intervention(b.site, b.intervention), b.rows)
            for b in bind(model, prepared, interventions)]


def _intervention(site: Any, value: Any) -> Intervention:
    """An Intervention as it is; a plain function (or any callable) as :class:`Fn`."""
    if isinstance(value, Intervention):
        return value
    if callable(value) and not isinstance(value, type):
        return Fn(value)
    raise TypeError(
        f"site {site}: expected an Intervention (Patch, Zero, ...) or a function x -> new x, "
        f"got {type(value).__name__}"
    )


def find_adapter(model: nn.Module, adapter: "str | Adapter | None" = None) -> Adapter:
    """The adapter for ``model``: the one named, or the first registered one that matches.

    Adapters marked ``specific`` (a subset of a broader adapter's models) are asked first, those marked
    ``fallback`` (serving any module) last, in plugin order among themselves.
    """
    from ..plugins import registry as plugin_registry
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
    def rank(a: Adapter) -> int:
        return 2 if getattr(a, "fallback", False) else 0 if getattr(a, "specific", False) else 1

    for candidate in sorted(adapters, key=rank):  # stable
        if plugin_registry.matches(candidate, model):  # a matches() that raises is skipped, with a warning
            return candidate
    cls = type(model)
    raise AdapterError(
        f"no crosspatch adapter serves {cls.__module__}.{cls.__qualname__}; installed adapters: "
        f"{', '.join(a.name for a in adapters) or 'none'}. To add an architecture, write an Adapter and register "
        f"it with the `register_adapters` hook in a plugin (entry-point group 'crosspatch')."
    )


def wrap(
    model: nn.Module,
    adapter: "str | Adapter | None" = None,
    *,
    tokenizer: Any = None,
    train_ok: bool = False,
) -> WrappedModel:
    """Wrap ``model`` with the adapter the plugin registry finds for it (or the one named).

    ``tokenizer`` (any object with ``encode``/``decode``, e.g. a HuggingFace tokenizer) lets runs and
    methods take text. A model in training mode is put into eval mode, with a
    :class:`TrainingModeWarning`: dropout would make every number noise. ``train_ok=True`` keeps it
    as it is. When the adapter found (not named) matches the model but cannot serve it, a ``fallback``
    adapter serves it instead, with a warning that says why the first one could not.

    ``crosspatch.wrap`` also takes a zoo name or a checkpoint folder (:func:`crosspatch.zoo.sources.wrap`).
    """
    if isinstance(model, WrappedModel):
        if tokenizer is not None and tokenizer is not model.tokenizer:
            model = copy.copy(model)
            model.tokenizer = tokenizer
        if train_ok and not model.train_ok:
            model = copy.copy(model)
            model.train_ok = True
        _evaluate(model.module, model.train_ok)
        return model
    if isinstance(model, str):
        raise TypeError(
            f"crosspatch.engine.model.wrap takes a torch.nn.Module; to load a zoo model or a checkpoint folder "
            f"by name use crosspatch.wrap({model!r})"
        )
    if not isinstance(model, nn.Module):
        raise TypeError(f"wrap expects a torch.nn.Module, got {type(model).__name__}")
    _evaluate(model, train_ok)
    found = find_adapter(model, adapter)
    try:
        return WrappedModel(model, found, tokenizer, train_ok)
    except AdapterError as exc:
        fallback = None if adapter is not None or getattr(found, "fallback", False) else _fallback(model)
        if fallback is None:
            raise
        warnings.warn(f"{exc} -- serving it with the {fallback.name!r} adapter instead", FallbackWarning, stacklevel=2)
        return WrappedModel(model, fallback, tokenizer, train_ok)


class FallbackWarning(UserWarning):
    """The adapter meant for a model could not serve it; a fallback adapter does."""


class TrainingModeWarning(UserWarning):
    """A model in training mode was put into eval mode by :func:`wrap`."""


def _evaluate(model: nn.Module, train_ok: bool) -> None:
    """Put a model in training mode into eval mode, saying so (unless ``train_ok``)."""
    if train_ok or not model.training:
        return
    model.eval()
    warnings.warn(
        f"{type(model).__name__} was in training mode, where dropout makes identical runs differ: crosspatch put it "
        f"in eval mode (model.eval()). To keep training mode, wrap it with cp.wrap(model, train_ok=True).",
        TrainingModeWarning, stacklevel=_caller_level(),
    )


def _caller_level() -> int:
    """The ``stacklevel`` of the first frame outside crosspatch, so a warning points at the user's line."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    frame, level = sys._getframe(1), 1  # the frame that calls warnings.warn
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package + os.sep):
        frame, level = frame.f_back, level + 1
    return level


def _fallback(model: nn.Module) -> Adapter | None:
    from ..plugins import registry as plugin_registry
    from ..plugins.registry import get_registry

    return next((a for a in get_registry().adapters() if getattr(a, "fallback", False) and plugin_registry.matches(a, model)), None)
