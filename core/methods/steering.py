"""Steering: difference-of-means vectors from contrast pairs, added at a site over a sweep of strengths.

Written only against sites, so the same two calls serve a language model's residual stream, a CLIP
tower and a VAE latent::

    v = steering_vector(m, positive, negative, "resid_post.1[pos=-1]")
    res = steering_curve(m, prompts, "resid_post.1[pos=-1]", alphas=[-4, -2, 0, 2, 4],
                         metric=cp.metrics.logit_diff(a, b), vector=v)
    plot_curve(res).savefig("steering.png")

A vector is given in the site family's layout without the batch axis, with the averaged axes
(``pos`` by default) kept at size 1 or dropped when leading, so it broadcasts like ``Add.vector``.
Every (site, alpha) pair is bound to its own rows of one batched forward with
``Bound(site, Add(v, alpha), rows=...)``.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..engine.adapter import batch_size as rows_of, repeat_rows
from ..engine.forward import Bound, execute
from ..engine.interventions import Add
from ..results.metrics import Metric, MetricContext
from ..engine.model import WrappedModel, wrap
from ..progress import progress_bar
from ..results.result import Result, collect_versions
from ..sites.selection import check_padding, last_columns, take_rows
from ..sites.site import LAST, Site, SiteError, Span
from .pairs import model_metric

__all__ = ["steering_vector", "steering_curve", "plot_curve", "DEFAULT_OVER"]

logger = logging.getLogger(__name__)

#: Axes averaged by default when a vector is computed (positions, and a latent's spatial axes).
DEFAULT_OVER = ("pos", "h", "w")


def _axis_selector(value: Any, size: int) -> Any:
    """A site-style selector (int, Span, tuple, None) or a Python one (slice, list) as an index."""
    if value is None:
        return slice(None)
    if isinstance(value, Span):
        return slice(value.start, value.stop)
    if isinstance(value, slice):
        return value
    if isinstance(value, int):
        i = value % size
        return slice(i, i + 1)
    if isinstance(value, (tuple, list)):
        return [int(i) % size for i in value]
    raise SiteError(f"cannot average over the selection {value!r}")


def _mean_activation(m: WrappedModel, inputs: Any, site: Site, over: Sequence[str], pos: Any) -> torch.Tensor:
    """Mean activation of ``site`` over the batch and the ``over`` axes (kept at size 1).

    On padded inputs the positions are each row's real tokens: a mean over positions skips padding (each
    row's mean over its own tokens, then the mean over rows), ``last`` (and a negative position, where the
    padding is on the left) is each row's last real token, as a site reads it."""
    fam = m.catalog.family(site.family)
    prepared = m.prepare(inputs)
    run = execute(m.module, m.adapter, m.catalog, prepared, capture=[site.key])
    full = run.cache[site.key]
    mask = run.cache.attention_mask
    out = full.double()
    for i, axis in enumerate(fam.axis_names, start=1):
        if axis not in over:
            continue
        chosen = pos if (axis == "pos" and pos is not None) else site.selection.get(axis)
        if axis == "pos" and chosen is not None and not isinstance(chosen, (slice, list)):
            # as a site reads it: last is each row's last real token; a negative position on rows padded
            # on the right is refused (it would be padding)
            only = Site(site.family, site.layer, (("pos", chosen),))
            check_padding(only, fam.axis_names, out.shape[1:], mask)
            if chosen == LAST:
                out = take_rows(out, last_columns(only, fam.axis_names, out, mask))
                continue
        index = _axis_selector(chosen, out.shape[i])
        picked = out[(slice(None),) * i + (index,)]
        if axis == "pos" and mask is not None and mask.shape == (out.shape[0], out.shape[i]):
            real = mask.to(picked.device, torch.float64)[:, index]  # [rows, picked positions]
            weight = real.view(real.shape[0], *([1] * (i - 1)), real.shape[1], *([1] * (picked.ndim - i - 1)))
            count = weight.sum(dim=i, keepdim=True)
            if bool((count == 0).any()):
                raise SiteError(f"site {site}: a row has no real token among the positions averaged ({chosen!r})")
            out = (picked * weight).sum(dim=i, keepdim=True) / count
        else:
            out = picked.mean(dim=i, keepdim=True)
    return out.mean(dim=0)


def steering_vector(
    model: "WrappedModel | nn.Module",
    positive_inputs: Any,
    negative_inputs: Any,
    site: "str | Site",
    *,
    pos: Any = None,
    over: Sequence[str] = DEFAULT_OVER,
    normalize: bool = False,
) -> torch.Tensor:
    """Difference of means ``mean(positive) - mean(negative)`` of the activation at ``site``.

    The mean runs over the batch and over the axes in ``over`` that the family has (positions by
    default, a spatial latent's ``h`` and ``w``): over the positions the site selects, or ``pos``
    (an int, slice or list) when given. Positive and negative inputs may differ in length.
    Axes not averaged keep their full size, so a selection on them (``[head=2]``, ``[dim=4]``)
    is honoured where the vector is added. The vector is in the family's layout without the batch
    axis, averaged axes at size 1 (dropped when leading), ready for ``Add``. ``normalize`` scales
    it to unit norm. A pattern site is refused: call once per concrete site. Padded inputs (texts of
    different lengths) average each row's real tokens only; ``pos=last`` is each row's last real token.
    """
    m = wrap(model)
    site = m.catalog.resolve(site)
    if site.is_pattern:
        raise SiteError(f"steering_vector needs one concrete site, got the pattern {site}")
    over = [a for a in over if a in m.catalog.family(site.family).axis_names]
    pos_mean = _mean_activation(m, positive_inputs, site, over, pos)
    neg_mean = _mean_activation(m, negative_inputs, site, over, pos)
    vector = pos_mean - neg_mean
    while vector.ndim > 1 and vector.shape[0] == 1:
        vector = vector.squeeze(0)
    if normalize:
        vector = vector / vector.norm().clamp_min(1e-12)
    return vector.to(m.dtype)


def _vectors_for(
    m: WrappedModel, sites: Sequence[Site], vector: Any, contrast: Any, pos: Any, over: Sequence[str], normalize: bool
) -> list[torch.Tensor]:
    if (vector is None) == (contrast is None):
        raise ValueError("give exactly one of vector= (a tensor, or a dict site -> tensor) or contrast=(positive, negative)")
    if contrast is not None:
        positive, negative = contrast
        return [steering_vector(m, positive, negative, s, pos=pos, over=over, normalize=normalize) for s in sites]
    if isinstance(vector, Mapping):
        lookup = {str(m.catalog.resolve(k)): torch.as_tensor(v) for k, v in vector.items()}
        missing = [str(s) for s in sites if str(s) not in lookup]
        if missing:
            raise KeyError(f"no steering vector for sites {missing}; vectors are given for {sorted(lookup)}")
        return [lookup[str(s)] for s in sites]
    return [torch.as_tensor(vector)] * len(sites)


def steering_curve(
    model: "WrappedModel | nn.Module",
    inputs: Any,
    site: "str | Site | Sequence[str | Site]",
    alphas: Sequence[float],
    metric: "Metric | Callable",
    *,
    vector: Any = None,
    contrast: "tuple[Any, Any] | None" = None,
    pos: Any = None,
    over: Sequence[str] = DEFAULT_OVER,
    normalize_vector: bool = False,
    relative: bool = True,
    batch_size: int = 64,
    progress: bool | None = None,
) -> Result:
    """The metric as ``alpha * vector`` is added at ``site``, for every alpha (and every site).

    ``vector`` is a tensor (shared by all sites) or a dict ``site -> tensor``; or pass
    ``contrast=(positive_inputs, negative_inputs)`` to compute a difference-of-means vector per site
    with :func:`steering_vector`. The value is the metric averaged over the inputs, minus the
    unsteered run's when ``relative`` (so alpha = 0 gives 0). One site gives dims ``("alpha",)``;
    a pattern or a list of sites gives ``("site", "alpha")``. All (site, alpha) pairs run batched,
    up to ``batch_size`` rows (pairs x inputs) per forward.
    """
    m = wrap(model)
    metric = model_metric(m, metric)  # text answers become token ids
    prepared = m.prepare(inputs)
    n = rows_of(prepared)
    single = isinstance(site, (str, Site)) and not m.catalog.resolve(site).is_pattern
    if single:
        sites = [m.catalog.resolve(site)]
    else:
        sites = list(m.catalog.expand(site, m.adapter.sizes(prepared)).sites)
    vectors = _vectors_for(m, sites, vector, contrast, pos, over, normalize_vector)
    alphas = [float(a) for a in alphas]
    if not alphas:
        raise ValueError("alphas is empty; give the steering strengths to sweep, e.g. [-2, -1, 0, 1, 2]")
    keys = sorted({s.key for s in sites})

    # The baseline hooks the same sites as the steered runs, so hooks alone never show as an effect.
    base = execute(m.module, m.adapter, m.catalog, prepared, capture=keys)
    mask = prepared.get("attention_mask")
    ctx = MetricContext(torch.arange(n, device=base.output.device), base.output, mask)
    with torch.inference_mode():
        baseline = metric(base.output, ctx).double()

    pairs = [(i, a) for i in range(len(sites)) for a in alphas]
    per_forward = max(1, batch_size // n)
    chunks = range(0, len(pairs), per_forward)
    values = []
    for start in progress_bar(chunks, progress, desc=f"steering {len(sites)} site(s) x {len(alphas)} alphas"):
        chunk = pairs[start : start + per_forward]
        batch = repeat_rows(prepared, len(chunk))
        bounds = [
            Bound(sites[i], Add(vectors[i], alpha), slice(j * n, (j + 1) * n)) for j, (i, alpha) in enumerate(chunk)
        ]
        run = execute(m.module, m.adapter, m.catalog, batch, bounds)
        rows = MetricContext(ctx.example.repeat(len(chunk)), base.output, batch.get("attention_mask"))
        with torch.inference_mode():
            out = metric(run.output, rows).double().view(len(chunk), n)
        values.append(out - baseline if relative else out)
    per_pair = torch.cat(values).mean(dim=1).view(len(sites), len(alphas)).cpu().numpy()

    if single:
        dims, coords, data = ("alpha",), {"alpha": alphas}, per_pair[0]
    else:
        dims, coords, data = ("site", "alpha"), {"site": [str(s) for s in sites], "alpha": alphas}, per_pair
    metadata = {
        "method": "steering",
        "metric": metric.name,
        "sites": [str(s) for s in sites],
        "relative": relative,
        "n_inputs": n,
        "vector_norms": [float(torch.as_tensor(v).double().norm()) for v in vectors],
        "vector_source": "contrast" if contrast is not None else "given",
        "baseline": float(baseline.mean()),
        "seed": None,
        "model": m.describe(),
        "adapter": m.adapter.name,
        "versions": collect_versions(),
    }
    return Result(np.asarray(data), dims, coords, metadata)


def plot_curve(result: Result, ax: Any = None, *, title: str | None = None):
    """A line plot of a steering curve (one line per site), metric against alpha. Returns the Figure."""
    from matplotlib.figure import Figure

    if "alpha" not in result.dims or result.values.ndim not in (1, 2):
        raise ValueError(f"plot_curve draws results with an 'alpha' dim (and maybe 'site'), got dims {result.dims}")
    if ax is None:
        figure = Figure(figsize=(5.5, 3.8), layout="constrained")
        ax = figure.add_subplot()
    figure = ax.figure
    alphas = np.asarray(result.coords["alpha"], dtype=float)
    if result.values.ndim == 1:
        ax.plot(alphas, result.values, marker="o")
    else:
        other = [d for d in result.dims if d != "alpha"][0]
        values = result.values if result.dims[1] == "alpha" else result.values.T
        for label, row in zip(result.coords[other], values):
            ax.plot(alphas, row, marker="o", label=str(label))
        ax.legend(fontsize=8, title=other)
    ax.axhline(0.0, color="0.6", linewidth=0.8)
    ax.axvline(0.0, color="0.6", linewidth=0.8)
    ax.set_xlabel("alpha (steering strength)")
    metric = str(result.metadata.get("metric", "value"))
    ax.set_ylabel(f"Δ {metric}" if result.metadata.get("relative") else metric)
    sites = result.metadata.get("sites") or []
    ax.set_title(title if title is not None else f"steering · {metric}" + (f" · {sites[0]}" if len(sites) == 1 else ""))
    ax.grid(alpha=0.3)
    return figure
