"""Turn a concrete site's axis selections into an index over its activation.

Selections keep every axis (an int ``i`` selects ``i:i+1``), so an intervention always sees a
tensor laid out like the family, ``[rows, *axes]``, just smaller. Ranges are checked against the
activation, never clipped: an empty or out-of-range one is a :class:`SiteError` naming the size.

``last`` selects a different column in each row (its last real token), which no shared index can
say: :func:`last_positions` gives the column per row, :func:`take_rows` reads them out as an axis
of size 1 (the site then selects index 0 of it, :func:`at_first`) and :func:`put_rows` writes them
back. :func:`check_padding` refuses a negative position where rows are padded on the right.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import torch

from .catalog import SiteFamily
from .site import LAST, POSITION_AXES, Site, SiteError, Span, span_range

__all__ = [
    "GROUP_PREFIX", "group_columns", "group_patterns", "group_sites", "input_groups", "named_groups", "take_group",
    "axis_index", "at_first", "check_padding", "index_for", "last_axes", "last_columns", "last_positions",
    "put_rows", "row_ends", "select", "take_rows",
]


def axis_index(site: Site, family: SiteFamily, shape: Sequence[int], device: torch.device) -> tuple:
    """An index for the axes (not the batch) of an activation of ``shape`` = ``[*axes]``."""
    if len(shape) != len(family.axes):
        raise SiteError(
            f"site {site}: the activation has shape {tuple(shape)} but family {family.name!r} "
            f"declares axes ({', '.join(family.axis_names)}); the adapter's catalog is wrong"
        )
    return index_for(site, family.axis_names, shape, device)


def index_for(site: Site, axis_names: Sequence[str], shape: Sequence[int], device: torch.device) -> tuple:
    """:func:`axis_index` given the axis names alone (what a :class:`~crosspatch.Cache` knows)."""
    selection = site.selection
    unknown = sorted(set(selection) - set(axis_names))
    if unknown:
        raise SiteError(f"site {site}: {site.key!r} has axes ({', '.join(axis_names)}), not {unknown}")
    parts: list = []
    for axis, size in zip(axis_names, shape):
        value = selection.get(axis)
        if value is None:
            parts.append(slice(None))
        elif isinstance(value, Span):
            parts.append(slice(*span_range(site, axis, value, size)))
        elif isinstance(value, tuple):
            bad = [i for i in value if not -size <= i < size]
            if bad:
                raise SiteError(f"site {site}: indices {bad} are out of range for axis {axis!r} of size {size}")
            parts.append(sorted({i % size for i in value}))  # a set: -1 and size-1 are one index
        elif value == LAST:
            raise SiteError(
                f"site {site}: {axis}=last is a different column in each row; it is read with take_rows, "
                f"not with one index"
            )
        elif isinstance(value, int):
            if not -size <= value < size:
                raise SiteError(f"site {site}: index {value} is out of range for axis {axis!r} of size {size}")
            i = value % size
            parts.append(slice(i, i + 1))
        else:
            raise SiteError(f"site {site}: axis {axis!r} still holds the pattern {value!r}; expand it first")
    if sum(isinstance(p, list) for p in parts) <= 1:
        return tuple(parts)
    # Several index sets: index every axis with broadcastable ranges (an outer product).
    ranges = [
        torch.tensor(p, device=device) if isinstance(p, list) else torch.arange(size, device=device)[p]
        for p, size in zip(parts, shape)
    ]
    n = len(ranges)
    return tuple(r.view(*([1] * i), -1, *([1] * (n - i - 1))) for i, r in enumerate(ranges))


def select(tensor: torch.Tensor, index: tuple, batched: bool = True) -> torch.Tensor:
    """Apply an :func:`axis_index` to a tensor with (``batched``) or without a leading batch axis."""
    return tensor[(slice(None), *index)] if batched else tensor[index]


# -- rows of their own: padding and ``last`` --------------------------------------------------------


def row_ends(mask: torch.Tensor) -> torch.Tensor:
    """``[rows]``: one past each row's last real token in an attention mask ``[rows, columns]``
    (0 for a row of padding only). Left and right padding alike."""
    real = mask.ne(0)
    return (real * torch.arange(1, real.shape[1] + 1, device=mask.device)).amax(dim=1)


def _first_column(mask: torch.Tensor, size: int, offset: int) -> int | None:
    """The mask column where an axis of ``size`` starts: ``offset`` for the positions of a run that
    computes columns ``offset..`` only, 0 for an axis over every column; None when the mask does not
    cover the axis (its length differs)."""
    columns = mask.shape[1]
    if size + offset == columns:
        return offset
    return 0 if size == columns else None


def _negative(value: object) -> bool:
    if isinstance(value, Span):
        return any(v is not None and v < 0 for v in (value.start, value.stop))
    if isinstance(value, tuple):
        return any(i < 0 for i in value)
    return isinstance(value, int) and value < 0


def check_padding(
    site: Site, axis_names: Sequence[str], shape: Sequence[int], mask: torch.Tensor | None, offset: int = 0
) -> None:
    """Refuse a negative position on rows padded on the right: it counts from the batch's last column,
    which is padding in those rows, while the metrics' ``pos=-1`` is each row's last real token.

    ``shape`` is ``[*axes]``; ``offset``: the run computes positions ``offset..`` only.
    """
    if mask is None:
        return
    for axis, value in site.sel:
        if axis not in POSITION_AXES or axis not in axis_names or not _negative(value):
            continue
        if _first_column(mask, shape[list(axis_names).index(axis)], offset) is None:
            continue
        columns = mask.shape[1]
        ends = row_ends(mask)
        short = (ends < columns).nonzero().flatten().tolist()
        if short:
            shown = ", ".join(f"row {r} at {int(ends[r]) - 1}" for r in short[:4]) + (", ..." if len(short) > 4 else "")
            raise SiteError(
                f"site {site}: the inputs are padded on the right ({len(short)} of {len(ends)} rows end before "
                f"column {columns - 1}: last real token of {shown}), so {axis}={value} counts from the batch's last "
                f"column, not from each row's last token (which the metrics read at -1). Write {axis}=last for "
                f"each row's last real token, pad on the left, or give columns 0..{columns - 1}"
            )


def last_axes(site: Site) -> list[str]:
    """The axes ``site`` selects ``last`` on."""
    return [axis for axis, value in site.sel if value == LAST]


def last_positions(
    site: Site, axis: str, size: int, rows: int, mask: torch.Tensor | None, offset: int = 0
) -> torch.Tensor:
    """``[rows]``: the column of each row's last real token along ``axis`` (of ``size``), by ``mask``
    (``[rows, columns]``; None: no padding, the last column). ``offset`` as in :func:`check_padding`."""
    if mask is None:
        return torch.full((rows,), size - 1, dtype=torch.long)
    if mask.shape[0] != rows:
        raise SiteError(f"site {site}: the attention mask has {mask.shape[0]} rows, the activation {rows}")
    first = _first_column(mask, size, offset)
    if first is None:
        raise SiteError(
            f"site {site}: {axis}=last reads each row's attention mask, which has {mask.shape[1]} columns, "
            f"but axis {axis!r} has {size} positions"
        )
    last = row_ends(mask) - 1 - first
    empty = (last < 0).nonzero().flatten().tolist()
    if empty:
        where = "" if not first else f" at or after position {first}, where this run starts"
        raise SiteError(f"site {site}: rows {empty[:8]} have no real token{where}, so {axis}=last selects nothing")
    return last


def last_columns(
    site: Site, axis_names: Sequence[str], tensor: torch.Tensor, mask: torch.Tensor | None, offset: int = 0
) -> list[tuple[int, torch.Tensor]]:
    """The picks :func:`take_rows` needs for ``site``'s ``last`` axes on ``tensor`` (``[rows, *axes]``);
    ``[]`` when it selects ``last`` nowhere."""
    names = list(axis_names)
    return [
        (1 + names.index(axis),
         last_positions(site, axis, tensor.shape[1 + names.index(axis)], tensor.shape[0], mask, offset))
        for axis in last_axes(site) if axis in names
    ]


def at_first(site: Site) -> Site:
    """``site`` with every ``last`` replaced by index 0 (of the axis :func:`take_rows` leaves)."""
    return Site(site.family, site.layer, tuple((a, 0 if v == LAST else v) for a, v in site.sel))


def take_rows(tensor: torch.Tensor, picks: Sequence[tuple[int, torch.Tensor]]) -> torch.Tensor:
    """``tensor`` with each ``(dim, columns)`` of ``picks`` cut to size 1: row ``r`` keeps ``columns[r]``
    of that dim (``dim`` counts the batch axis). A copy."""
    rows = torch.arange(tensor.shape[0], device=tensor.device)
    for dim, columns in picks:
        moved = tensor.movedim(dim, 1)
        tensor = moved[rows, columns.to(tensor.device)].unsqueeze(1).movedim(1, dim)
    return tensor


def put_rows(tensor: torch.Tensor, picks: Sequence[tuple[int, torch.Tensor]], value: torch.Tensor) -> None:
    """Write ``value`` (``tensor`` as :func:`take_rows` cut it) back into ``tensor`` in place."""
    (dim, columns), rest = picks[0], picks[1:]
    if rest:
        inner = take_rows(tensor, picks[:1])
        put_rows(inner, rest, value)
        value = inner
    rows = torch.arange(tensor.shape[0], device=tensor.device)
    tensor.movedim(dim, 1)[rows, columns.to(tensor.device)] = value.movedim(dim, 1)[:, 0]


# -- named position groups ------------------------------------------------------------------------
#
# A group is a named set of positions carried with the inputs, one boolean mask ``[rows, columns]``
# under ``GROUP_PREFIX + name`` (an adapter puts ``group.image`` there; a user adds ``group.question``).
# ``resid_pre.3[pos=image]`` names one: :func:`group_sites` resolves it, row by row, into concrete sites
# over the rows whose group holds the same columns (one site for all rows when the columns agree).

#: The key prefix of a position group's mask in prepared inputs.
GROUP_PREFIX = "group."

_GROUP_SELECTION = re.compile(r"\b(" + "|".join(POSITION_AXES) + r")=([A-Za-z_][A-Za-z0-9_]*)")


def input_groups(inputs: Mapping[str, object]) -> dict[str, torch.Tensor]:
    """The position groups carried with prepared ``inputs``: ``{name: mask [rows, columns]}``."""
    return {
        key[len(GROUP_PREFIX):]: value for key, value in inputs.items()
        if isinstance(key, str) and key.startswith(GROUP_PREFIX) and isinstance(value, torch.Tensor)
    }


def named_groups(site: "str | Site") -> dict[str, str]:
    """``{axis: group}`` for every position axis ``site`` selects by a group name (not ``last``)."""
    if isinstance(site, Site):
        return {}
    return {axis: name for axis, name in _GROUP_SELECTION.findall(site) if name not in (LAST,)}


def group_columns(mask: torch.Tensor) -> list[tuple[int, ...]]:
    """Each row's columns of a group mask ``[rows, columns]``, as sorted tuples."""
    return [tuple(row.nonzero().flatten().tolist()) for row in mask.bool().cpu()]


def group_sites(
    site: "str | Site", groups: Mapping[str, torch.Tensor]
) -> list[tuple[Site, "slice | None"]]:
    """``site`` with each group name on a position axis replaced by that group's columns, row by row.

    Returns ``(site, rows)`` pairs: one pair with ``rows=None`` when the group holds the same columns in
    every row (or the site names no group), else one per run of consecutive rows that agree, with their
    ``slice``. A group missing from ``groups``, or empty in a row, is a :class:`SiteError`.
    """
    named = named_groups(site)
    if not named:
        return [(Site.parse(site), None)]
    text = _GROUP_SELECTION.sub(lambda m: m.group(0) if m.group(2) == LAST else f"{m.group(1)}=0", str(site))
    parsed = Site.parse(text)
    per_axis: dict[str, list[tuple[int, ...]]] = {}
    rows: int | None = None
    for axis, name in named.items():
        if name not in groups:
            raise SiteError(
                f"site {site}: no position group {name!r} in the inputs; they carry "
                f"{', '.join(sorted(groups)) or 'none'} (plus 'last' and explicit positions)"
            )
        columns = group_columns(groups[name])
        empty = [r for r, c in enumerate(columns) if not c]
        if empty:
            raise SiteError(f"site {site}: group {name!r} holds no position in rows {empty[:8]}")
        if rows is not None and len(columns) != rows:
            raise SiteError(f"site {site}: the groups it names have different numbers of rows")
        rows = len(columns)
        per_axis[axis] = columns
    assert rows is not None
    out: list[tuple[Site, slice | None]] = []
    start = 0
    for r in range(1, rows + 1):
        if r < rows and all(cols[r] == cols[start] for cols in per_axis.values()):
            continue
        concrete = parsed.with_(**{axis: cols[start] for axis, cols in per_axis.items()})
        out.append((concrete, slice(start, r)))
        start = r
    if len(out) == 1:
        return [(out[0][0], None)]
    return out


def group_patterns(sites: "str | list[str]", inputs: Mapping[str, Any]) -> "str | list[str]":
    """Site patterns with position-group names (``resid_pre.*[pos=image]``) turned into the columns the prepared
    ``inputs`` give each group (``resid_pre.*[pos={1,...,16}]``), before a sweep expands patterns by the site
    grammar (which knows ``last`` but no other group). A group must hold the same columns in every row (align the rows,
    e.g. no padding before it); a pattern naming no group is returned as it is."""
    groups = input_groups(inputs)

    def one(pattern: str) -> str:
        resolved = group_sites(pattern, groups)
        if len(resolved) != 1 or resolved[0][1] is not None:
            raise SiteError(
                f"site {pattern}: its groups hold different columns in different rows; a sweep patches one set of "
                f"columns for every row, so align the rows (same layout, no padding before the group)"
            )
        return str(resolved[0][0])

    return one(sites) if isinstance(sites, str) else [one(s) for s in sites]


def take_group(tensor: torch.Tensor, mask: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """The group's positions of ``tensor`` (``[rows, ...]``, positions along ``dim``) as ``[rows, k, ...]``
    (positions in order), when every row's group holds ``k`` positions."""
    counts = mask.sum(dim=1)
    if bool((counts != counts[0]).any()):
        raise SiteError(
            f"the group holds {sorted(set(counts.tolist()))} positions in different rows; take it row by row "
            f"(tensor[r][..., mask[r], ...])"
        )
    moved = tensor.movedim(dim, 1)
    picked = moved[mask.to(tensor.device).bool()]  # rows * k, in row order then column order
    return picked.reshape(tensor.shape[0], int(counts[0]), *moved.shape[2:]).movedim(1, dim)
