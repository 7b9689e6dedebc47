"""An intervention in an SAE's feature basis that keeps the reconstruction error.

The edited activation is ``x' = decode(f') + (x - decode(f))`` with ``f = encode(x)``, computed as
``x + sae.write(f' - f)`` (``(f' - f) @ W_dec``) so an unedited site is returned bit for bit. The sweeps
over features that use it are :mod:`crosspatch.methods.sae_patching`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Literal

import torch

from ..engine.interventions import ApplyContext, Intervention
from ..sites.site import SiteError
from .erasure import feature_axis
from .sae import SAE

__all__ = ["SAEFeatures"]


Op = Literal["ablate", "set", "scale", "add", "patch", "reconstruct"]
_OPS = ("ablate", "set", "scale", "add", "patch", "reconstruct")


@dataclass
class SAEFeatures(Intervention):
    """Edit SAE features at a site, keeping the reconstruction error (see the module doc)."""

    kind: ClassVar[str] = "sae_features"
    sae: SAE = None  # type: ignore[assignment]
    features: Any = None  # an int, a list of ints, or None for every feature
    op: Op = "ablate"
    value: Any = 0.0
    source: Any = None  # a Cache or inputs, for op="patch"
    axis: str | None = None

    def __post_init__(self):
        if self.op not in _OPS:
            raise ValueError(f"op must be one of {', '.join(_OPS)}, got {self.op!r}")
        if self.op == "patch" and self.source is None:
            raise ValueError("op='patch' needs source= (a Cache or inputs to run)")

    @property
    def source_inputs(self) -> Any:
        return self.source if self.op == "patch" else None

    def _index(self) -> Any:
        if self.features is None:
            return slice(None)
        if isinstance(self.features, int):
            return [self.features]
        return list(self.features)

    def apply(self, x: torch.Tensor, ctx: ApplyContext) -> torch.Tensor:
        if self.sae is None:
            raise SiteError(f"SAEFeatures at {ctx.site}: no SAE given")
        to_last, from_last = self._layout(x, ctx)
        last = to_last(x)
        sae = self.sae
        dtype = sae.W_dec.dtype
        f = sae.encode(last.to(device=sae.W_dec.device))
        if self.op == "reconstruct":
            return from_last(sae.decode(f).to(device=x.device, dtype=x.dtype))
        g = f.clone()
        idx = self._index()
        if self.op == "ablate":
            g[..., idx] = 0
        elif self.op == "set":
            g[..., idx] = torch.as_tensor(self.value, dtype=dtype, device=g.device)
        elif self.op == "scale":
            g[..., idx] = g[..., idx] * torch.as_tensor(self.value, dtype=dtype, device=g.device)
        elif self.op == "add":
            g[..., idx] = g[..., idx] + torch.as_tensor(self.value, dtype=dtype, device=g.device)
        else:  # patch
            src = ctx.select(ctx.require_source("SAEFeatures(op='patch')"))
            if src.shape[0] not in (1, x.shape[0]):
                raise SiteError(
                    f"SAEFeatures at {ctx.site}: the source has {src.shape[0]} rows but the target has {x.shape[0]}"
                )
            f_src = sae.encode(to_last(src).to(device=sae.W_dec.device)).expand_as(f)
            g[..., idx] = f_src[..., idx]
        delta = sae.write(g - f)  # = decode(g) - decode(f), exactly zero where nothing changed
        return from_last(last + delta.to(device=x.device, dtype=x.dtype))

    def _layout(self, x: torch.Tensor, ctx: ApplyContext) -> tuple[Callable, Callable]:
        """How the activation's feature axis becomes the last one, and back. The SAE reads one axis
        (``axis``, else ``dim`` / ``channel`` / the last); an SAE whose ``d_in`` is ``head x d_head`` reads
        every head of a ``head_z``-like family at once (sae-lens ``hook_z`` SAEs: heads concatenated)."""
        names = ctx.family.axis_names
        d_in = self.sae.d_in
        heads, d_head = ctx.target.shape[-2:]
        if self.axis is None and names[-2:] == ("head", "d_head") and d_head != d_in:
            if heads * d_head == d_in:
                for name, part in zip(names[-2:], ctx.index[-2:]):
                    if part != slice(None):
                        raise SiteError(
                            f"SAEFeatures at {ctx.site}: the SAE reads every head's {names[-1]!r} at once "
                            f"(d_in={d_in} = head x d_head); do not select {name!r}"
                        )
                return (lambda t: t.flatten(-2)), (lambda t: t.unflatten(-1, (heads, -1)))
        name = feature_axis(names, self.axis)
        i = names.index(name) + 1
        if ctx.index[i - 1] != slice(None):
            raise SiteError(f"SAEFeatures at {ctx.site}: the SAE reads the whole {name!r} axis; do not select it")
        if x.shape[i] != d_in:
            raise SiteError(
                f"SAEFeatures at {ctx.site}: the SAE has d_in={d_in} but {name!r} has {x.shape[i]}"
                + (f" (and head x d_head = {heads * d_head})" if names[-2:] == ("head", "d_head") else "")
            )
        return (lambda t: t.movedim(i, -1)), (lambda t: t.movedim(-1, i))
