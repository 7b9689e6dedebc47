"""Attention knockout, and binding interventions whose sites name position groups.

:class:`Knockout` blocks attention edges from one set of positions (``src``, the keys) to another
(``dst``, the queries) in chosen layers and heads: blocked edges get probability zero and each query's
remaining probabilities are renormalised, which is the softmax over the unblocked scores alone (the
scores of blocked edges set to minus infinity). It is written at the ``attn_pattern`` family, so it
works on every model whose adapter serves that family writable, respects whatever mask the model
applied (causal, sliding window, padding: an edge the model masked stays at zero) and grouped-query
attention (the pattern is per query head).

Position sets are group names carried with the inputs (``"image"``, ``"question"``: masks
``group.<name>`` of prepared inputs, see :mod:`crosspatch.sites.selection`) or masks given directly
(``[pos]`` or ``[rows, pos]``). Inside a vision tower (``family="vision.attn_pattern"``) they are masks over
the patches of an image (its pattern's query axis), per image when the tower has an ``image`` axis.
:func:`bind` turns knockouts and ``{site: intervention}`` pairs whose sites name groups
(``resid_pre.3[pos=image]``) into the :class:`~crosspatch.engine.forward.Bound` list ``run`` takes, so
knockouts, patches and ablations combine in one forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import torch

from ..sites.catalog import Catalog, SiteFamily
from ..sites.selection import group_sites, input_groups
from ..sites.site import POSITION_AXES, Site, SiteError
from .forward import Bound
from .interventions import KnockoutEdges

__all__ = ["Knockout", "KnockoutEdges", "bind"]  # KnockoutEdges lives with the other interventions

@dataclass(frozen=True)
class Knockout:
    """Block attention from positions ``src`` (keys) to positions ``dst`` (queries).

    ``src`` / ``dst``: a group name carried with the inputs (``"image"``, ``"question"``, ``"last"``) or a
    boolean mask ``[pos]`` / ``[rows, pos]``. ``layers``: an int, an iterable of ints, or None for every
    layer of ``family``. ``heads``: None for all, an int or a list of query heads. ``rows``: the rows of the
    batch it applies to (a slice; None for all), as :class:`~crosspatch.engine.forward.Bound` has them.
    ``family``: the pattern family written (``vision.attn_pattern`` for a vision tower).

    In a vision tower the masks are over the pattern's own query axis (``pos`` of a CLIP tower, class token
    included; ``patch`` of Qwen2-VL's), the patches of one image, which carry no groups: masks only. With
    several images a row (an ``image`` axis), ``[patch]`` / ``[rows, patch]`` apply to every image alike and
    ``[rows, image, patch]`` to each image its own (rows 1 for every row); see :class:`KnockoutEdges`.
    """

    src: Any
    dst: Any
    layers: "int | Iterable[int] | None" = None
    heads: "int | Sequence[int] | None" = None
    rows: slice | None = None
    family: str = "attn_pattern"

    def bounds(self, catalog: Catalog, inputs: Mapping[str, Any] | None = None) -> list[Bound]:
        """One :class:`Bound` per layer, on the pattern site of that layer."""
        fam = catalog.family(self.family)
        if fam.layers is None or not fam.writable:
            raise SiteError(f"Knockout: family {self.family!r} is not a writable per-layer attention pattern")
        KnockoutEdges.pattern_axes(fam)
        if self.layers is None:
            layers = list(range(fam.layers))
        else:
            layers = [self.layers] if isinstance(self.layers, int) else list(self.layers)
        groups = input_groups(inputs or {})
        src, dst = (self._mask(v, groups, what, fam) for v, what in ((self.src, "src"), (self.dst, "dst")))
        if self.rows is not None:
            src = src[self.rows] if src.shape[0] > 1 else src
            dst = dst[self.rows] if dst.shape[0] > 1 else dst
        sel = {} if self.heads is None else {"head": self.heads if isinstance(self.heads, int) else tuple(self.heads)}
        out = []
        for layer in layers:
            site = catalog.resolve(Site.make(self.family, layer, **sel))
            out.append(Bound(site, KnockoutEdges(src, dst), self.rows))
        return out

    @staticmethod
    def _mask(value: Any, groups: Mapping[str, torch.Tensor], what: str, fam: SiteFamily) -> torch.Tensor:
        image, query, _ = KnockoutEdges.pattern_axes(fam)
        n = fam.axis(query).size or query
        shapes = f"[{n}] / [rows, {n}]" + (f" / [rows, image, {n}]" if image else "")
        if isinstance(value, str):
            if not _grouped(fam):
                raise SiteError(
                    f"Knockout: {what} names the position group {value!r}, but the {query!r} positions of "
                    f"{fam.name!r} ({', '.join(fam.axis_names)}) are not the inputs' token positions (a tower's "
                    f"patches), and carry no groups; give a boolean mask {shapes}"
                )
            if value not in groups:
                raise SiteError(
                    f"Knockout: {what} names the position group {value!r}, but the inputs carry "
                    f"{', '.join(sorted(groups)) or 'no groups'}; prepare them with the model (m.prepare) or give a mask"
                )
            return groups[value]
        mask = torch.as_tensor(value)
        if mask.dtype != torch.bool:
            named = "a group name or " if _grouped(fam) else ""
            raise SiteError(f"Knockout: {what} is {named}a boolean mask {shapes}, got {mask.dtype}")
        if mask.ndim not in ((1, 2, 3) if image else (1, 2)):
            raise SiteError(f"Knockout: {what} has shape {tuple(mask.shape)}; give a boolean mask {shapes}")
        return mask if mask.ndim > 1 else mask.unsqueeze(0)


def _grouped(fam: SiteFamily) -> bool:
    """Whether position groups (masks over the inputs' token columns) index ``fam``'s queries and keys: its query
    axis is a position axis the inputs size (``pos`` of a language model), not a tower's patches (``patch``, or a
    ``pos`` whose size the catalog fixes)."""
    axis = fam.axes[-2]
    return axis.name in POSITION_AXES and axis.size is None


def bind(model: Any, inputs: Mapping[str, Any], interventions: Any) -> list[Bound]:
    """The :class:`Bound` list ``model.run(inputs, ...)`` takes, from knockouts and ``(site, intervention)``
    pairs (a mapping or a list; a :class:`Bound` passes as it is) whose sites may name position groups.

    ``model`` is a wrapped model (its catalog is read); ``inputs`` are its prepared inputs (``model.prepare``),
    which carry the groups. A site naming a group whose columns differ between rows is bound row by row;
    an intervention reading a source (Patch) cannot be split so, and is refused then.
    """
    catalog: Catalog = model.catalog
    groups = input_groups(inputs)
    items = interventions.items() if isinstance(interventions, Mapping) else interventions
    out: list[Bound] = []
    for item in items:
        if isinstance(item, Knockout):
            out += item.bounds(catalog, inputs)
            continue
        if isinstance(item, Bound):
            out.append(item)
            continue
        site, intervention = item
        pairs = group_sites(site, groups)
        if len(pairs) > 1 and getattr(intervention, "source_inputs", None) is not None:
            raise SiteError(
                f"site {site}: the group it names holds different columns in different rows, so it is bound row by "
                f"row, but {type(intervention).__name__} reads a source with one row per batch row; align the rows "
                f"(pad so the group covers the same columns) or bind each row with its own source"
            )
        out += [Bound(concrete, intervention, rows) for concrete, rows in pairs]
    return out
