"""An intervention in an SAE's feature basis that keeps the reconstruction error.

The edited activation is ``x' = decode(f') + (x - decode(f))`` with ``f = encode(x)``, computed as
``x + (f' - f) @ W_dec`` so an unedited site is returned bit for bit. The sweeps over features that
use it are :mod:`crosspatch.methods.sae_patching`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

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
        name = feature_axis(ctx.family.axis_names, self.axis)
        i = ctx.family.axis_names.index(name) + 1
        if ctx.index[i - 1] != slice(None):
            raise SiteError(f"SAEFeatures at {ctx.site}: the SAE reads the whole {name!r} axis; do not select it")
        if x.shape[i] != self.sae.d_in:
            raise SiteError(f"SAEFeatures at {ctx.site}: the SAE has d_in={self.sae.d_in} but {name!r} has {x.shape[i]}")
        last = x.movedim(i, -1)
        sae = self.sae
        dtype = sae.W_dec.dtype
        f = sae.encode(last.to(device=sae.W_dec.device))
        if self.op == "reconstruct":
            new = sae.decode(f).to(device=x.device, dtype=x.dtype)
            return new.movedim(-1, i)
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
            f_src = sae.encode(src.movedim(i, -1).to(device=sae.W_dec.device)).expand_as(f)
            g[..., idx] = f_src[..., idx]
        delta = (g - f) @ sae.W_dec  # = decode(g) - decode(f), exactly zero where nothing changed
        return (last + delta.to(device=x.device, dtype=x.dtype)).movedim(-1, i)
