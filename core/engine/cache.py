"""Captured activations of one run, keyed by family and layer (``"resid_post.3"``)."""

from __future__ import annotations

from typing import Iterator, Mapping, Sequence

import torch

from ..sites.selection import at_first, check_padding, index_for, last_columns, select, take_rows
from ..sites.site import Site, SiteError

__all__ = ["Cache"]


class Cache(Mapping[str, torch.Tensor]):
    """Full activations ``[batch, *axes]`` per site key.

    Indexing with a site that has selections returns the selected part, every axis kept:
    ``cache["resid_post.3[pos=2]"]`` has shape ``[batch, 1, d_model]``. ``attention_mask``
    (``[batch, positions]``, kept by the run that captured the cache) says where each row's real
    tokens are: ``cache["resid_post.3[pos=last]"]`` is each row's last one, and a negative position on
    rows padded on the right is refused, as in a run.
    """

    def __init__(
        self,
        tensors: Mapping[str, torch.Tensor] | None = None,
        axes: Mapping[str, tuple[str, ...]] | None = None,
        attention_mask: torch.Tensor | None = None,
    ):
        self._tensors: dict[str, torch.Tensor] = dict(tensors or {})
        self.axes: dict[str, tuple[str, ...]] = dict(axes or {})
        self.attention_mask = attention_mask

    def _store(self, key: str, value: torch.Tensor, axes: tuple[str, ...]) -> None:
        self._tensors[key] = value
        self.axes[key] = axes

    def __getitem__(self, site: "str | Site") -> torch.Tensor:
        site = Site.parse(site)
        try:
            full = self._tensors[site.key]
        except KeyError:
            raise KeyError(
                f"site {site.key!r} was not captured; this cache holds: {', '.join(self._tensors) or 'nothing'}"
            ) from None
        if not site.sel:
            return full
        names = self.axes.get(site.key)
        if names is None:
            raise SiteError(f"the cache does not know the axes of {site.key!r}; cannot select {site}")
        if len(names) != full.ndim - 1:
            raise SiteError(f"the cache holds {site.key!r} with shape {tuple(full.shape)} but axes {names}")
        check_padding(site, names, full.shape[1:], self.attention_mask)
        picks = last_columns(site, names, full, self.attention_mask)
        if picks:
            full, site = take_rows(full, picks), at_first(site)
        return select(full, index_for(site, names, full.shape[1:], full.device))

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def __contains__(self, site: object) -> bool:
        try:
            return Site.parse(site).key in self._tensors  # type: ignore[arg-type]
        except (SiteError, TypeError):
            return False

    def to(self, *args, **kwargs) -> "Cache":
        moved = {k: v.to(*args, **kwargs) for k, v in self._tensors.items()}
        mask = self.attention_mask
        if mask is not None:  # the mask follows the tensors' device; a dtype is for activations only
            mask = mask.to(next((v.device for v in moved.values()), mask.device))
        return Cache(moved, self.axes, mask)

    def detach(self) -> "Cache":
        return Cache({k: v.detach() for k, v in self._tensors.items()}, self.axes, self.attention_mask)

    def clone(self) -> "Cache":
        """A copy of every tensor (outside inference mode, a copy autograd may use), the mask kept."""
        return Cache({k: v.clone() for k, v in self._tensors.items()}, self.axes, self.attention_mask)

    def rows(self, index: "slice | torch.Tensor | Sequence[int]", keys: "Sequence[str] | None" = None) -> "Cache":
        """Batch rows ``index`` (a slice, or row indices, repeats allowed) of the tensors (those of ``keys``,
        or all) and of the attention mask, so ``pos=last`` still finds each row's last real token."""
        if not isinstance(index, slice):
            index = torch.as_tensor(index, dtype=torch.long)
        take = lambda t: t[index] if isinstance(index, slice) else t[index.to(t.device)]  # noqa: E731
        names = list(self._tensors) if keys is None else list(keys)
        mask = None if self.attention_mask is None else take(self.attention_mask)
        return Cache({k: take(self._tensors[k]) for k in names}, {k: self.axes[k] for k in names if k in self.axes}, mask)

    @property
    def batch_size(self) -> int | None:
        return next(iter(self._tensors.values())).shape[0] if self._tensors else None

    def to_dict(self) -> dict:
        out = {"tensors": dict(self._tensors), "axes": {k: list(v) for k, v in self.axes.items()}}
        if self.attention_mask is not None:
            out["attention_mask"] = self.attention_mask
        return out

    @classmethod
    def from_dict(cls, data: Mapping) -> "Cache":
        return cls(data["tensors"], {k: tuple(v) for k, v in data.get("axes", {}).items()}, data.get("attention_mask"))

    def __repr__(self) -> str:
        body = ", ".join(f"{k}: {tuple(v.shape)}" for k, v in self._tensors.items())
        return f"Cache({body})"
