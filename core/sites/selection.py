"""Turn a concrete site's axis selections into an index over its activation.

Selections keep every axis (an int ``i`` selects ``i:i+1``), so an intervention always sees a
tensor laid out like the family, ``[rows, *axes]``, just smaller.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .catalog import SiteFamily
from .site import Site, SiteError, Span

__all__ = ["axis_index", "index_for", "select"]


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
            parts.append(slice(value.start, value.stop))
        elif isinstance(value, tuple):
            bad = [i for i in value if not -size <= i < size]
            if bad:
                raise SiteError(f"site {site}: indices {bad} are out of range for axis {axis!r} of size {size}")
            parts.append([i % size for i in value])
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
