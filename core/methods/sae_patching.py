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

from typing import Any, Callable, Literal, Sequence

import torch
from torch import nn

from ..engine.adapter import batch_size as rows_of, repeat_rows
from ..engine.forward import Bound, execute
from ..engine.interventions import Intervention
from ..results.metrics import Metric, MetricContext
from ..engine.model import WrappedModel, wrap
from ..progress import progress_bar
from ..results.result import Result, collect_versions
from ..trainable.sae import SAE
from ..sites.site import Site, SiteError
from ..trainable.sae_features import SAEFeatures
from .pairs import model_metric, prepare_pair

__all__ = ["SAEFeatures", "sae_feature_patching", "sae_feature_ablation"]


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
    pair = prepare_pair(model, clean, corrupt, metric, direction)  # text answers become token ids
    m, metric, base_in, source_in = pair.model, pair.metric, pair.base, pair.source
    site = m.catalog.resolve(site)
    if site.is_pattern:
        raise SiteError(f"sae_feature_patching needs one concrete site, got the pattern {site}")
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
    metric = model_metric(m, metric)
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
