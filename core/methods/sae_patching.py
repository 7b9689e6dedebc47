"""SAE feature interventions: edit a site's activation in an SAE's feature basis, keep the error term.

The edited activation is ``x' = decode(f') + (x - decode(f))`` with ``f = encode(x)``, computed as
``x + (f' - f) @ W_dec`` so an unedited site is returned bit for bit: the SAE's reconstruction error
never leaks into the model. Operations on the chosen ``features``: ``ablate`` (set to 0), ``set``,
``scale``, ``add`` (``value``), ``patch`` (the source run's features: from a ``Cache`` or inputs,
as :class:`crosspatch.Patch`) and ``reconstruct`` (replace ``x`` with ``decode(f)``, dropping the
error term, to measure what splicing the SAE in costs).

    edit = SAEFeatures(sae, features=[3, 17], op="ablate")
    out = m.run(prompts, {"resid_post.1": edit})
    res = sae_feature_patching(m, clean, corrupt, "resid_post.1[pos=-1]", sae, metric)  # dims ("feature",)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Literal, Sequence

import torch
from torch import nn

from ..adapter import batch_size as rows_of, repeat_rows
from ..engine import Bound, execute
from ..interventions import ApplyContext, Intervention
from ..metrics import Metric, MetricContext, as_metric
from ..model import WrappedModel, wrap
from ..progress import progress_bar
from ..results import Result, collect_versions
from ..sae import SAE
from ..sites import Site, SiteError
from .erasure import feature_axis

__all__ = ["SAEFeatures", "sae_feature_patching", "sae_feature_ablation"]

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


def _feature_sweep(
    m: WrappedModel,
    base_in: dict,
    site: Site,
    make: Callable[[int], Intervention],
    features: Sequence[int],
    metric: Metric,
    clean_out: torch.Tensor,
    baseline: torch.Tensor,
    batch_size: int,
    progress: bool | None,
    desc: str,
) -> torch.Tensor:
    n = rows_of(base_in)
    per_forward = max(1, batch_size // n)
    example = torch.arange(n, device=clean_out.device)
    effects = []
    for start in progress_bar(range(0, len(features), per_forward), progress, desc=desc):
        chunk = features[start : start + per_forward]
        inputs = repeat_rows(base_in, len(chunk))
        bounds = [Bound(site, make(j), slice(r * n, (r + 1) * n)) for r, j in enumerate(chunk)]
        run = execute(m.module, m.adapter, m.catalog, inputs, bounds)
        ctx = MetricContext(example.repeat(len(chunk)), clean_out, inputs.get("attention_mask"))
        with torch.inference_mode():
            effects.append(metric(run.output, ctx).double().view(len(chunk), n) - baseline)
    return torch.cat(effects).mean(dim=1)


def _metadata(m: WrappedModel, method: str, metric: Metric, site: Site, sae: SAE, n: int, **extra) -> dict:
    return {
        "method": method, "metric": metric.name, "sites": [str(site)], "n_prompts": n,
        "sae": {"d_in": sae.d_in, "d_sae": sae.d_sae, "kind": sae.kind, "k": sae.k}, "seed": None,
        **extra, "model": m.describe(), "adapter": m.adapter.name, "versions": collect_versions(),
    }


def sae_feature_patching(
    model: "WrappedModel | nn.Module",
    clean: Any,
    corrupt: Any,
    site: "str | Site",
    sae: SAE,
    metric: "Metric | Callable",
    *,
    features: Sequence[int] | None = None,
    direction: Literal["denoising", "noising"] = "denoising",
    axis: str | None = None,
    batch_size: int = 64,
    progress: bool | None = None,
) -> Result:
    """Patch each SAE feature (alone) from one run into the other; dims ``("feature",)``.

    Like :func:`crosspatch.activation_patching`, but the unit is one SAE feature at one site:
    ``denoising`` runs the corrupt inputs with the clean run's value of the feature, ``noising``
    the reverse. The value is the metric's mean change against the unpatched run.
    """
    if direction not in ("denoising", "noising"):
        raise ValueError(f"direction must be 'denoising' or 'noising', got {direction!r}")
    m = wrap(model)
    metric = as_metric(metric)
    site = m.catalog.resolve(site)
    if site.is_pattern:
        raise SiteError(f"sae_feature_patching needs one concrete site, got the pattern {site}")
    clean_in, corrupt_in = m.prepare(clean), m.prepare(corrupt)
    base_in, source_in = (corrupt_in, clean_in) if direction == "denoising" else (clean_in, corrupt_in)
    source = execute(m.module, m.adapter, m.catalog, source_in, capture=[site.key])
    base = execute(m.module, m.adapter, m.catalog, base_in, capture=[site.key])
    n = rows_of(base_in)
    clean_out = source.output if direction == "denoising" else base.output
    ctx = MetricContext(torch.arange(n, device=base.output.device), clean_out, base_in.get("attention_mask"))
    with torch.inference_mode():
        baseline = metric(base.output, ctx).double()
        other = metric(source.output, ctx).double()
    features = list(range(sae.d_sae)) if features is None else [int(j) for j in features]
    values = _feature_sweep(
        m, base_in, site, lambda j: SAEFeatures(sae, [j], "patch", source=source.cache, axis=axis),
        features, metric, clean_out, baseline, batch_size, progress, f"patching {len(features)} SAE features",
    )
    meta = _metadata(m, "sae_feature_patching", metric, site, sae, n, direction=direction,
                     baseline={"unpatched": float(baseline.mean()), "source": float(other.mean())})
    return Result(values.cpu().numpy(), ("feature",), {"feature": features}, meta)


def sae_feature_ablation(
    model: "WrappedModel | nn.Module",
    inputs: Any,
    site: "str | Site",
    sae: SAE,
    metric: "Metric | Callable",
    *,
    features: Sequence[int] | None = None,
    axis: str | None = None,
    batch_size: int = 64,
    progress: bool | None = None,
) -> Result:
    """Zero each SAE feature (alone), keeping the error term; dims ``("feature",)``."""
    m = wrap(model)
    metric = as_metric(metric)
    site = m.catalog.resolve(site)
    if site.is_pattern:
        raise SiteError(f"sae_feature_ablation needs one concrete site, got the pattern {site}")
    prepared = m.prepare(inputs)
    base = execute(m.module, m.adapter, m.catalog, prepared, capture=[site.key])
    n = rows_of(prepared)
    ctx = MetricContext(torch.arange(n, device=base.output.device), base.output, prepared.get("attention_mask"))
    with torch.inference_mode():
        baseline = metric(base.output, ctx).double()
    features = list(range(sae.d_sae)) if features is None else [int(j) for j in features]
    values = _feature_sweep(
        m, prepared, site, lambda j: SAEFeatures(sae, [j], "ablate", axis=axis),
        features, metric, base.output, baseline, batch_size, progress, f"ablating {len(features)} SAE features",
    )
    meta = _metadata(m, "sae_feature_ablation", metric, site, sae, n, baseline=float(baseline.mean()))
    return Result(values.cpu().numpy(), ("feature",), {"feature": features}, meta)
