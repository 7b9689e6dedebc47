"""The catalog: every site family one wrapped model has, with axes, sizes and how to reach it.

The engine needs nothing else from an adapter. The catalog also checks sites against the model
(unknown family, layer out of range, unknown axis, index out of range) and expands patterns
with ``*`` into the concrete sites of a sweep.
"""

from __future__ import annotations

import difflib
import itertools
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Protocol, Sequence

import torch

from .site import ANY, LAST, POSITION_AXES, Site, SiteError, Span, site_sequence, span_range

__all__ = ["Axis", "LinearFrom", "SiteFamily", "Catalog", "Sweep", "Reach", "Handle", "Callback"]


# What an adapter implements for each family; the engine only calls install() and removes the handles.
Callback = Callable[[torch.Tensor], "torch.Tensor | None"]


class Handle(Protocol):
    def remove(self) -> None: ...


class Reach(Protocol):
    def install(self, layer: int | None, callback: Callback) -> list[Handle]:
        """Hook the activation of ``layer``; return every handle installed.

        An install is all or nothing, also under a ``KeyboardInterrupt`` at any of its lines: it registers
        the undo of each change (a hook, a switched attribute) before making the change, and undoes what
        it did when it raises (``crosspatch.engine.reach.installing``). Removing a handle twice is harmless.
        """
        ...


@dataclass(frozen=True)
class Axis:
    """A named axis of an activation; ``size`` is None when the input sets it (positions)."""

    name: str
    size: int | None = None


@dataclass(frozen=True)
class LinearFrom:
    """A family whose value is a bias-free linear map of family ``source``'s value at the same layer,
    applied independently at every index of the ``shared`` axes (each head's write is its ``head_z``
    times its rows of the output projection).

    First-order methods read ``source`` instead: ``(a' - a) . dmetric/da`` summed over the other axes
    equals ``(s' - s) . dmetric/ds``, so nothing of the (wider) family itself is built. ``apply`` maps a
    source value ``[batch, *source axes]`` at ``layer`` to this family's value ``[batch, *axes]``.
    """

    source: str
    shared: tuple[str, ...]
    apply: Callable[[torch.Tensor, "int | None"], torch.Tensor] = field(compare=False, repr=False)


@dataclass(frozen=True)
class SiteFamily:
    """A kind of activation: its layout after the batch axis, its layers and its reach.

    ``linear_from``, when set, says the family is a linear map of another one (:class:`LinearFrom`).
    """

    name: str
    axes: tuple[Axis, ...]
    reach: Reach = field(compare=False, repr=False)
    layers: int | None = None
    doc: str = ""
    writable: bool = True
    linear_from: LinearFrom | None = field(default=None, compare=False, repr=False)

    @property
    def axis_names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.axes)

    def axis(self, name: str) -> Axis:
        for a in self.axes:
            if a.name == name:
                return a
        raise KeyError(name)


@dataclass(frozen=True)
class Sweep:
    """The concrete sites a pattern expands to, laid out on named dims for a result."""

    sites: tuple[Site, ...]
    dims: tuple[str, ...]
    coords: dict[str, list]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(len(self.coords[d]) for d in self.dims)

    def __len__(self) -> int:
        return len(self.sites)


class Catalog:
    """The site families of one wrapped model, in the order the forward pass reaches them."""

    def __init__(self, families: Iterable[SiteFamily], model_name: str = "model",
                 unavailable: Mapping[str, str] | None = None):
        """``unavailable``: families the model has in principle but the adapter does not serve, with the
        reason (an inferred mapping that failed its proof); listed by ``repr`` and named in errors."""
        self.unavailable: dict[str, str] = dict(unavailable or {})
        self.families: dict[str, SiteFamily] = {}
        for fam in families:
            if fam.name in self.families:
                raise ValueError(f"site family {fam.name!r} is listed twice in the catalog of {model_name}")
            self.families[fam.name] = fam
        self.model_name = model_name

    def __contains__(self, name: str) -> bool:
        return name in self.families

    def __iter__(self):
        return iter(self.families.values())

    def __len__(self) -> int:
        return len(self.families)

    def order(self, family: str) -> int:
        return list(self.families).index(family)

    def family(self, name: str) -> SiteFamily:
        try:
            return self.families[name]
        except KeyError:
            if name in self.unavailable:
                raise SiteError(f"{self.model_name} does not serve site family {name!r}: {self.unavailable[name]}") from None
            close = difflib.get_close_matches(name, self.families, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise SiteError(
                f"{self.model_name} has no site family {name!r}.{hint} "
                f"Families: {', '.join(self.families)}"
            ) from None

    def through_source(self, site: Site) -> Site:
        """``site`` on its family's :class:`LinearFrom` source when it selects only axes the map keeps
        (``head_out.3[head=1]`` as ``head_z.3[head=1]``), else ``site`` itself. Patching, zeroing, resampling,
        averaging or scaling the source is the same intervention on the family, at less cost."""
        linear = self.family(site.family).linear_from
        if linear is None or set(site.selection) - set(linear.shared):
            return site
        return Site(linear.source, site.layer, site.sel)

    def resolve(self, site: "Site | str", sizes: Mapping[str, int] | None = None) -> Site:
        """Check a site (concrete or pattern) against the model; normalise negative layers and indices.

        Negative positions (``pos``, ``key_pos``) are checked against ``sizes`` but kept as written: the
        end they count from belongs to the inputs a run is given (:func:`~crosspatch.sites.selection.check_padding`)."""
        site = Site.parse(site)
        fam = self.family(site.family)
        layer = site.layer
        if fam.layers is None:
            if layer is not None:
                raise SiteError(f"site {site}: family {fam.name!r} has no layers; write {fam.name!r}")
        elif layer is None:
            raise SiteError(
                f"site {site}: family {fam.name!r} has layers 0..{fam.layers - 1}; "
                f"write {fam.name}.<layer> or {fam.name}.* for all of them"
            )
        elif layer != ANY:
            if not -fam.layers <= layer < fam.layers:
                raise SiteError(f"site {site}: layer {layer} is out of range 0..{fam.layers - 1} for {fam.name!r}")
            layer %= fam.layers
        sel = []
        for axis_name, value in site.sel:
            if axis_name not in fam.axis_names:
                raise SiteError(
                    f"site {site}: family {fam.name!r} has no axis {axis_name!r}; "
                    f"its axes are {', '.join(fam.axis_names)}"
                )
            size = fam.axis(axis_name).size or (sizes or {}).get(axis_name)
            sel.append((axis_name, _check_selector(site, axis_name, value, size)))
        sel.sort(key=lambda item: fam.axis_names.index(item[0]))  # canonical: the family's axis order
        return Site(fam.name, layer, tuple(sel))

    def expand(self, patterns: "str | Site | Sequence[str | Site]", sizes: Mapping[str, int] | None = None) -> Sweep:
        """Expand ``*`` in a pattern into concrete sites.

        One pattern gives dims ``layer`` (when the layer is ``*``) followed by each wildcard axis
        in the family's axis order. A list of patterns gives one dim, ``site``.
        """
        if isinstance(patterns, (str, Site)):
            return self._expand_one(self.resolve(patterns, sizes), sizes or {})
        sites: list[Site] = []
        for p in site_sequence(patterns):
            sites.extend(self._expand_one(self.resolve(p, sizes), sizes or {}).sites)
        return Sweep(tuple(sites), ("site",), {"site": [str(s) for s in sites]})

    def _expand_one(self, site: Site, sizes: Mapping[str, int]) -> Sweep:
        fam = self.families[site.family]
        dims: list[str] = []
        ranges: list[list] = []
        if site.layer == ANY:
            dims.append("layer")
            ranges.append(list(range(fam.layers)))
        selection = site.selection
        for axis in fam.axes:
            if selection.get(axis.name) == ANY:
                size = axis.size or sizes.get(axis.name)
                if size is None:
                    raise SiteError(
                        f"site {site}: the size of axis {axis.name!r} depends on the input; "
                        f"pass the inputs (or sizes={{{axis.name!r}: n}}) to expand it"
                    )
                dims.append(axis.name)
                ranges.append(list(range(size)))
        sites = []
        for combo in itertools.product(*ranges):
            values = dict(zip(dims, combo))
            layer = values.pop("layer", site.layer)
            sites.append(site.with_(layer=layer, **values))
        return Sweep(tuple(sites), tuple(dims), dict(zip(dims, ranges)))

    def __repr__(self) -> str:
        rows = [("family", "layers", "axes", "")]
        for fam in self:
            axes = ", ".join(f"{a.name}={a.size if a.size is not None else '?'}" for a in fam.axes)
            rows.append((fam.name, "-" if fam.layers is None else str(fam.layers), axes, fam.doc))
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = [f"Catalog of {self.model_name} ({len(self)} site families)"]
        for r in rows:
            lines.append("  " + "  ".join(r[i].ljust(widths[i]) for i in range(3)) + ("  " + r[3] if r[3] else ""))
        if self.unavailable:
            lines.append("  not served:")
            lines += [f"    {name}: {why}" for name, why in self.unavailable.items()]
        return "\n".join(lines)


def _check_selector(site: Site, axis: str, value, size: int | None):
    def check_index(i: int) -> int:
        if size is None:
            return i
        if not -size <= i < size:
            raise SiteError(f"site {site}: index {i} is out of range for axis {axis!r} of size {size}")
        return i % size

    if value == ANY:
        return value
    if value == LAST:
        if axis not in POSITION_AXES:
            raise SiteError(
                f"site {site}: 'last' is each row's last real token, for a position axis "
                f"({', '.join(POSITION_AXES)}), not {axis!r}"
            )
        return value
    keep = axis in POSITION_AXES  # a position counted from the end keeps its sign (see resolve)
    if isinstance(value, Span):
        if size is None:
            return value
        start, stop = span_range(site, axis, value, size)
        return value if keep else Span(start, stop)
    if isinstance(value, tuple):
        if not value:
            raise SiteError(f"site {site}: an empty set of indices selects nothing on axis {axis!r}")
        checked = [check_index(i) for i in value]
        return value if keep else tuple(sorted(set(checked)))
    if isinstance(value, int) and not isinstance(value, bool):
        checked_int = check_index(value)
        return value if keep else checked_int
    raise SiteError(f"site {site}: axis {axis!r} got {value!r}; use an int, a:b, {{a,b}}, '*' or 'last'")
