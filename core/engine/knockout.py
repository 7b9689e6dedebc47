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
(``[pos]`` or ``[rows, pos]``). :func:`bind` turns knockouts and ``{site: intervention}`` pairs whose
sites name groups (``resid_pre.3[pos=image]``) into the :class:`~crosspatch.engine.forward.Bound`
list ``run`` takes, so knockouts, patches and ablations combine in one forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import torch

from ..sites.catalog import Catalog
from ..sites.selection import group_sites, input_groups
from ..sites.site import Site, SiteError
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
        if self.layers is None:
            layers = list(range(fam.layers))
        else:
            layers = [self.layers] if isinstance(self.layers, int) else list(self.layers)
        groups = input_groups(inputs or {})
        src, dst = (self._mask(v, groups, what) for v, what in ((self.src, "src"), (self.dst, "dst")))
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
    def _mask(value: Any, groups: Mapping[str, torch.Tensor], what: str) -> torch.Tensor:
        if isinstance(value, str):
            if value not in groups:
                raise SiteError(
                    f"Knockout: {what} names the position group {value!r}, but the inputs carry "
                    f"{', '.join(sorted(groups)) or 'no groups'}; prepare them with the model (m.prepare) or give a mask"
                )
            return groups[value]
        mask = torch.as_tensor(value)
        if mask.dtype != torch.bool:
            raise SiteError(f"Knockout: {what} is a group name or a boolean mask [pos] / [rows, pos], got {mask.dtype}")
        return mask if mask.ndim == 2 else mask.unsqueeze(0)


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
