"""Site families from the sites of a probe: one per name, its layers, merged axes and a reach."""

from __future__ import annotations

import logging
from typing import Sequence

from torch import nn

from crosspatch.sites.catalog import Axis, Reach, SiteFamily

from .axes import AxisHints, axis_names
from .naming import SiteSpec
from .reaches import AttributeOutput, FieldOutput, FirstInput

__all__ = ["build_families"]

log = logging.getLogger(__name__)


def build_families(model: nn.Module, specs: Sequence[SiteSpec], hints: AxisHints) -> list[SiteFamily]:
    """One :class:`SiteFamily` per family name, in the order the forward computes them."""
    groups: dict[str, list[SiteSpec]] = {}
    for spec in sorted(specs, key=lambda s: s.order):
        groups.setdefault(spec.family, []).append(spec)
    families = []
    for name, group in groups.items():
        group = _distinct(name, group)
        if group:
            families.append(_family(model, name, group, hints))
    return families


def _distinct(name: str, group: list[SiteSpec]) -> list[SiteSpec]:
    """The group's sites as layers 0..n-1 (or one site without a layer); a name two modules would share is
    kept for the first and dropped, with a warning, for the others (only module names such as ``_0``
    next to a numbered sibling can do that)."""
    by_layer: dict[int | None, SiteSpec] = {}
    for spec in group:
        kept = by_layer.setdefault(spec.layer, spec)
        if kept is not spec:
            log.warning("generic adapter: %r and %r would both be site %s; only the first gets it",
                        kept.path, spec.path, name if spec.layer is None else f"{name}.{spec.layer}")
    layers = sorted(by_layer, key=lambda layer: -1 if layer is None else layer)
    if (None in by_layer and len(by_layer) > 1) or (None not in by_layer and layers != list(range(len(layers)))):
        log.warning("generic adapter: the modules named %s do not form one family (%s); it has no sites",
                    name, ", ".join(s.path for s in group))
        return []
    return [by_layer[layer] for layer in layers]


def _family(model: nn.Module, name: str, group: list[SiteSpec], hints: AxisHints) -> SiteFamily:
    first = group[0]
    copy = any(s.seen.changed for s in group)
    return SiteFamily(
        name,
        _axes([s.seen.shape for s in group], hints),
        _reach(model, first, copy),
        layers=None if first.layer is None else len(group),
        doc=_doc(first),
    )


def _axes(shapes: list[tuple[int, ...]], hints: AxisHints) -> tuple[Axis, ...]:
    """Axis names every layer agrees on (else ``d1..``), and sizes where every layer has the same one."""
    names = {axis_names(shape, hints) for shape in shapes}
    chosen = names.pop() if len(names) == 1 else tuple(f"d{i + 1}" for i in range(len(shapes[0])))
    sizes = [{shape[i] for shape in shapes} for i in range(len(chosen))]
    return tuple(Axis(n, s.pop() if len(s) == 1 and min(s) > 0 else None) for n, s in zip(chosen, sizes))


def _reach(model: nn.Module, spec: SiteSpec, copy: bool) -> Reach:
    if spec.kind == "input":
        return FirstInput(model, spec.template, family=spec.family, copy=copy)
    if spec.attribute:
        return AttributeOutput(model, spec.template, str(spec.key), family=spec.family, copy=copy)
    return FieldOutput(model, spec.template, spec.key, family=spec.family, copy=copy)


def _doc(spec: SiteSpec) -> str:
    if not spec.path:
        where = "the model"
    elif spec.template == "{layer}":
        where = "the model's child L"
    else:
        where = repr(spec.template.replace("{layer}", "L"))
    if spec.kind == "input":
        return f"first input of {where}"
    return f"output of {where}" if spec.key is None else f"field {spec.key!r} of the output of {where}"
