"""Site names for the modules of a probe: which module is which family and layer.

The site grammar ends a name at its layer (``module.encoder.layer.3`` is family ``module.encoder.layer``,
layer 3, and nothing may follow the 3), so the names are built around it:

* A **stack** is a module whose children are all numbered ``0..n-1`` and alike (each ran once, with
  inputs and outputs of the same ranks and fields). Its children are the layers of one family, and
  so is everything inside them that every child has alike: ``transformer.h.3.attn.c_attn`` is
  ``module.transformer.h.attn.c_attn.3``, and ``module.transformer.h.attn.*`` sweeps over the blocks.
* A name has at most one layer, the outermost stack's. Any other number on the path (a child of a
  stack inside a layer, of a container whose children differ, a part only some layers have) is
  spelled ``_<n>``: ``features.0`` of a convnet whose steps differ is ``module.features._0``.
* A stack's own output cannot be ``module.<path>`` (that family holds its children), so it is
  ``stack.<path>``, and its input ``stack_in.<path>``; a root stack's are ``stack`` and ``stack_in``.
* ``module.<path>`` is a module's output, or the first batched tensor field of a tuple, dict,
  ``ModelOutput`` or dataclass it returns; every other such field is ``module_out<i>.<path>`` (element
  ``i`` of a tuple or list) or ``module_out_<key>.<path>`` (a key or field name); ``module_in.<path>``
  is its first positional input. The root module's are ``module``, ``module_out<i>``, ``module_in``.

Modules that ran more than once (shared), that did not run, or that answer to a second path get no
site; their would-be families are kept with the reason, for the error a user asking for them sees.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Iterator

from crosspatch.sites.site import SiteError, site_key

from .errors import SharedModuleError
from .fields import FieldKey
from .probe import ModuleRecord, Probe, Seen

__all__ = ["Name", "SiteSpec", "site_specs"]

log = logging.getLogger(__name__)

_PART = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_KEY = re.compile(r"[A-Za-z0-9_]+\Z")


@dataclass(frozen=True)
class Name:
    """Where a module's sites live: the family name's parts after the root word, its layer, and its path
    with the layer's segment written ``{layer}`` (the reach's path)."""

    parts: tuple[str, ...]
    layer: int | None
    template: str


@dataclass(frozen=True)
class SiteSpec:
    """One site a module serves: family and layer, the module, and what of it (its input, or an output field)."""

    family: str
    layer: int | None
    path: str
    template: str
    kind: str  # "input" or "output"
    key: FieldKey
    attribute: bool
    seen: Seen
    order: tuple[int, int]  # when the forward computes it: (hook event, field index)


def _is_number(segment: str) -> bool:
    return segment.isascii() and segment.isdigit() and segment == str(int(segment))


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


class _Namer:
    """Names paths of one probe; stack decisions are cached."""

    def __init__(self, probe: Probe):
        self.probe = probe
        self._stacks: dict[str, bool] = {}

    def record(self, path: str) -> ModuleRecord | None:
        return self.probe.records.get(self.probe.aliases.get(path, path))

    def exists(self, path: str) -> bool:
        return path in self.probe.children or path in self.probe.aliases

    def signature(self, path: str) -> tuple | None:
        record = self.record(path)
        if record is None:
            return None
        rank_in = None if record.input is None else len(record.input.shape)
        return record.calls, rank_in, tuple((f.key, f.attribute, len(f.seen.shape)) for f in record.outputs)

    def is_stack(self, path: str) -> bool:
        if path not in self._stacks:
            self._stacks[path] = self._is_stack(path)
        return self._stacks[path]

    def _is_stack(self, path: str) -> bool:
        names = self.probe.children.get(self.probe.aliases.get(path, path), ())
        if not names or list(names) != [str(i) for i in range(len(names))]:
            return False
        signatures = {self.signature(_join(path, name)) for name in names}
        only = next(iter(signatures))
        return len(signatures) == 1 and only is not None and only[0] == 1

    def alike(self, stack: str, rel: str) -> bool:
        """Whether every child of ``stack`` has ``rel`` inside it, alike."""
        paths = [_join(stack, name, rel) for name in self.probe.children[self.probe.aliases.get(stack, stack)]]
        return all(self.exists(p) for p in paths) and len({self.signature(p) for p in paths}) == 1

    def name(self, path: str) -> Name | None:
        """The module's :class:`Name`, or None when a segment cannot be spelled in a site."""
        segments = path.split(".") if path else []
        parts: list[str] = []
        template: list[str] = []
        layer = None
        for i, segment in enumerate(segments):
            if _is_number(segment):
                parent, rel = ".".join(segments[:i]), ".".join(segments[i + 1 :])
                if layer is None and self.is_stack(parent) and self.alike(parent, rel):
                    layer = int(segment)
                    template.append("{layer}")
                    continue
                part = f"_{segment}"
            else:
                part = segment
            if not _PART.match(part):
                return None
            parts.append(part)
            template.append(segment.replace("{", "{{").replace("}", "}}"))
        return Name(tuple(parts), layer, ".".join(template))

    def base(self, path: str, name: Name) -> str:
        """``stack`` for a stack whose children take their layer from it, else ``module``."""
        return "stack" if name.layer is None and self.is_stack(path) else "module"


def _output_root(base: str, key: FieldKey, primary: bool) -> str | None:
    if primary:
        return base
    if isinstance(key, int):
        return f"{base}_out{key}"
    if isinstance(key, str) and _KEY.match(key):
        return f"{base}_out_{key}"
    return None  # a key that cannot be spelled in a site


def _specs_of(path: str, name: Name, base: str, record: ModuleRecord) -> Iterator[SiteSpec]:
    def family(root: str) -> str:
        return ".".join((root, *name.parts))

    if record.input is not None:
        yield SiteSpec(family(f"{base}_in"), name.layer, path, name.template, "input", None, False,
                       record.input, (record.entered, 0))
    for i, out in enumerate(record.outputs):
        root = _output_root(base, out.key, i == 0)
        if root is None:
            log.debug("generic adapter: field %r of the output of %r has no site name", out.key, path)
            continue
        yield SiteSpec(family(root), name.layer, path, name.template, "output", out.key, out.attribute,
                       out.seen, (record.left, i))


def site_specs(probe: Probe) -> tuple[list[SiteSpec], dict[str, SiteError]]:
    """Every site of the probe's modules, and the would-be families that have none, with the error to raise."""
    namer = _Namer(probe)
    specs: list[SiteSpec] = []
    missing: dict[str, SiteError] = {}
    for path, record in probe.records.items():
        name = namer.name(path)
        if name is None:
            log.debug("generic adapter: module %r has a name the site grammar cannot spell", path)
            continue
        mine = list(_specs_of(path, name, namer.base(path, name), record))
        if record.calls == 1:
            specs.extend(mine)
            continue
        for spec in mine:
            missing[spec.family] = SharedModuleError(
                f"site {site_key(spec.family, spec.layer)}: module {path or '(the root)'!r} runs {record.calls} times "
                f"in one forward (a shared or reused module), so one site cannot name its {spec.kind}. The generic "
                f"adapter serves modules that run once: give each use its own module, or write an adapter for "
                f"this model (docs/plugins.md)"
            )
    sites = {(s.path, s.kind, s.key): s for s in specs}
    for alias, first in probe.aliases.items():
        name = namer.name(alias)
        record = probe.records.get(first)
        if name is None or record is None:
            continue
        for spec in _specs_of(alias, name, namer.base(alias, name), record):
            real = sites.get((first, spec.kind, spec.key))
            where = f"; its site is {site_key(real.family, real.layer)}" if real is not None else ""
            missing.setdefault(spec.family, SiteError(
                f"site {site_key(spec.family, spec.layer)}: {alias!r} is a second path to module {first!r}{where}"
            ))
    for path in probe.children:
        name = namer.name(path)
        if path in probe.records or name is None:
            continue
        for root in (namer.base(path, name), f"{namer.base(path, name)}_in"):
            family = ".".join((root, *name.parts))
            missing.setdefault(family, SiteError(
                f"site {site_key(family, name.layer)}: module {path!r} did not run in the forward on these inputs "
                f"(a container such as a ModuleList never runs itself; its children have sites)"
            ))
    return specs, missing
