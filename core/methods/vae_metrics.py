"""Causal metrics of latents (and other units) of generative models, after the causal intervention
framework for VAEs (Roy et al., arXiv:2505.03530): causal effect strength, intervention
specificity, circuit modularity, and factor-level mediation.

Built only on the engine (``execute`` with :class:`~crosspatch.engine.Bound` interventions), so they
work for every adapter whose catalog has the sites: ``latent.z`` by default, or ``latent.mu``,
``encoder.block.<i>`` (units = channels) and so on. The definitions are crosspatch's own, written
out here so that every number is reproducible; the paper motivates them but does not fix these details.

**Effect maps.** For unit ``i`` of the site (latent ``i`` of ``latent.z``; for a spatial latent the
whole channel), a value grid ``V``, inputs ``x_1..x_n`` and a baseline output ``b``::

    E_i[p] = mean over x, v in V of  dist( out(x | do(u_i = v))[p],  b(x)[p] )

``p`` runs over the output's elements (channel, h, w of a reconstruction). Parameters and defaults:

* ``values`` = ``(-3, -2, -1, 0, 1, 2, 3)``: the prior N(0, 1) of a VAE latent covers about ±3.
* ``intervention`` = ``"set"`` (``do(u_i = v)``, :class:`~crosspatch.interventions.Set`) or ``"add"``
  (``u_i + v``, a shift by ``v``, :class:`~crosspatch.interventions.Add`).
* ``baseline`` = ``"recon"``: ``b(x)`` is the unintervened output; ``"grid_mean"``: ``b`` is the mean
  output over the grid for that unit and input, so ``E_i`` measures how much the output varies as
  the unit sweeps the grid, wherever the encoder put it.
* ``distance`` = ``"abs"`` (``|a - b|``) or ``"sq"`` (``(a - b)**2``).

**Causal effect strength** ``CES_i = mean_p E_i[p]``: the mean output change per element.
``normalize`` = ``None`` (default, raw), ``"sum"`` (divide by the sum over units, so they sum to 1)
or ``"max"`` (divide by the largest).

**Intervention specificity** — how concentrated ``E_i`` is over the output. With ``q = E_i / sum E_i``
over ``P`` elements, ``measure="entropy"`` (default) gives ``1 - H(q) / log P``: 1 when one element
takes all the change, 0 when the change is spread evenly. ``measure="gini"`` gives the Gini coefficient
of ``E_i`` scaled by ``P / (P - 1)`` (also 0 even, 1 on one element). ``over="elements"`` (default)
treats every output value as an element; ``over="pixels"`` first sums ``E_i`` over the output's first
axis (colour channels), so a change of colour at one pixel counts once. NaN for a unit with no effect.

**Circuit modularity** ``1 - mean_{i<j} |corr(E_i, E_j)|`` over the *active* units, those with
``CES_i > active * max CES`` (``active`` = 0.01): 1 when units change unrelated parts of the output,
0 when their effect maps are proportional. Pearson correlation over the elements (``over`` as above);
a pair involving a constant map counts as 0. NaN with fewer than two active units. Maps on disjoint
elements are slightly anti-correlated under Pearson's centring (two one-element maps over ``P``
elements: ``|corr| = 1 / (P - 1)``, negligible for images); ``similarity="cosine"`` uses the
uncentred correlation ``<E_i, E_j> / (|E_i| |E_j|)`` instead, exactly 0 for disjoint maps.

**Factor mediation.** For pairs ``(x, x')`` that differ in exactly one generative factor ``f``, the
total change is ``D = out(x') - out(x)`` and unit ``i``'s share is ``D_i = out(x | u_i <- u_i(x')) - out(x)``
(interchange of that one unit, :class:`~crosspatch.interventions.Patch`). ``measure="projection"``
(default) reports ``sum <D_i, D> / sum <D, D>`` over pairs and elements: the fraction of the factor's
output change that the unit alone reproduces (1 = all of it; for a decoder linear in the units the
shares of all units sum to 1). ``measure="distance"`` reports ``sum |D_i| / sum |D|`` (size of the
change, in any direction, relative to the total).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..engine.adapter import batch_size as rows_of
from ..engine.forward import execute
from ..engine.interventions import Patch
from ..engine.model import WrappedModel, wrap
from ..results.result import Result, collect_versions
from ..sites.site import Site
from .latent import Distance, _intervention, _value_list, output_distance, run_jobs, unit_sweep

__all__ = [
    "DEFAULT_VALUES", "EffectMaps", "effect_maps", "causal_effect_strength", "intervention_specificity",
    "circuit_modularity", "latent_metrics", "factor_mediation",
]

DEFAULT_VALUES: tuple[float, ...] = (-3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0)


@dataclass
class EffectMaps:
    """Per-unit effect maps ``maps[i] = E_i`` (float64, CPU, shape ``[units, *output axes]``) and how
    they were made (``metadata``: site, values, intervention, baseline, distance, inputs, model...)."""

    maps: torch.Tensor
    dim: str
    labels: list
    sites: list[str]
    metadata: dict[str, Any] = field(default_factory=dict)

    def strength(self) -> torch.Tensor:
        return self.maps.reshape(len(self.labels), -1).mean(dim=1)

    def flat(self, over: str = "elements") -> torch.Tensor:
        """``[units, P]``: every output element, or (``over="pixels"``) summed over the first output axis."""
        if over == "elements":
            return self.maps.reshape(len(self.labels), -1)
        if over == "pixels":
            if self.maps.ndim < 3:
                raise ValueError("over='pixels' needs outputs with a channel axis and at least one more axis")
            return self.maps.sum(dim=1).reshape(len(self.labels), -1)
        raise ValueError(f"over must be 'elements' or 'pixels', got {over!r}")

    def to_result(self) -> Result:
        """The maps as a :class:`Result` with dims ``(unit dim, channel, h, w)`` (or ``out0, out1...``)."""
        shape = tuple(self.maps.shape[1:])
        names = ("channel", "h", "w") if len(shape) == 3 else tuple(f"out{i}" for i in range(len(shape)))
        return Result(self.maps, (self.dim, *names), {self.dim: list(self.labels)},
                      {**self.metadata, "method": "effect_maps"})


def effect_maps(
    model: "WrappedModel | nn.Module",
    inputs: Any,
    site: "str | Site" = "latent.z",
    *,
    values: Any = DEFAULT_VALUES,
    intervention: Literal["set", "add"] = "set",
    baseline: Literal["recon", "grid_mean"] = "recon",
    distance: Distance = "abs",
    batch_size: int | None = 1024,
    progress: bool | None = None,
) -> EffectMaps:
    """``E_i`` for every unit of ``site`` (see the module docstring). ``inputs`` are anything the
    adapter takes (images, or ``{"latents": z}`` to skip the encoder); every (unit, value) pair runs on
    all ``n`` inputs, up to ``batch_size`` rows per forward."""
    if baseline not in ("recon", "grid_mean"):
        raise ValueError(f"baseline must be 'recon' or 'grid_mean', got {baseline!r}")
    m = wrap(model)
    prepared = m.prepare(inputs)
    sweep = unit_sweep(m, site, prepared)
    values = _value_list(values)
    k = len(values)
    base = execute(m.module, m.adapter, m.catalog, prepared, capture=[sweep.key]).output
    jobs = [[(s, _intervention(intervention, v))] for s in sweep.sites for v in values]
    maps: list[torch.Tensor] = []
    for start, out in run_jobs(m, prepared, jobs, batch_size=batch_size, progress=progress, align=k,
                               desc=f"effect maps of {len(sweep)} units of {sweep.key}"):
        out = out.view(-1, k, *out.shape[1:]).double()  # [units in chunk, values, n, *output]
        ref = base.double().unsqueeze(0).unsqueeze(0) if baseline == "recon" else out.mean(dim=1, keepdim=True)
        maps.append(output_distance(out, ref, distance).mean(dim=(1, 2)))
    metadata = {
        "site": str(site), "sites": [str(s) for s in sweep.sites], "values": [_jsonable(v) for v in values],
        "intervention": intervention, "baseline": baseline, "distance": distance, "n_inputs": base.shape[0],
        "model": m.describe(), "adapter": m.adapter.name, "versions": collect_versions(), "seed": None,
    }
    return EffectMaps(torch.cat(maps).cpu(), sweep.dim, list(sweep.labels), [str(s) for s in sweep.sites], metadata)


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return value


def _maps(source: Any, inputs: Any, site: Any, options: dict) -> EffectMaps:
    if isinstance(source, EffectMaps):
        if options or inputs is not None:
            raise TypeError("pass either effect maps, or a model with inputs and effect-map options, not both")
        return source
    if inputs is None:
        raise TypeError("give inputs (images or {'latents': z}) along with the model, or precomputed EffectMaps")
    return effect_maps(source, inputs, site, **options)


def _result(values, maps: EffectMaps, metric: str, extra: dict) -> Result:
    meta = {k: v for k, v in maps.metadata.items()}
    meta.update({"method": "vae_metrics", "metric": metric, **extra})
    if np.ndim(values) == 0:
        return Result(np.array(float(values)), (), {}, meta)
    return Result(values, (maps.dim,), {maps.dim: list(maps.labels)}, meta)


def causal_effect_strength(
    source: "WrappedModel | nn.Module | EffectMaps",
    inputs: Any = None,
    site: "str | Site" = "latent.z",
    *,
    normalize: Literal["sum", "max"] | None = None,
    **options: Any,
) -> Result:
    """``CES_i``, dims ``("latent",)`` (or the unit axis): mean output change per element when unit
    ``i`` takes the grid's values. ``options`` go to :func:`effect_maps`."""
    maps = _maps(source, inputs, site, options)
    strength = maps.strength()
    if normalize == "sum":
        strength = strength / strength.sum()
    elif normalize == "max":
        strength = strength / strength.max()
    elif normalize is not None:
        raise ValueError(f"normalize must be None, 'sum' or 'max', got {normalize!r}")
    return _result(strength.numpy(), maps, "causal_effect_strength", {"normalize": normalize})


def _specificity(flat: torch.Tensor, measure: str) -> torch.Tensor:
    units, p = flat.shape
    total = flat.sum(dim=1, keepdim=True)
    if p < 2:
        return torch.full((units,), math.nan, dtype=torch.float64)
    if measure == "entropy":
        q = flat / total
        h = -torch.where(q > 0, q * q.clamp_min(1e-300).log(), torch.zeros_like(q)).sum(dim=1)
        out = 1.0 - h / math.log(p)
    elif measure == "gini":
        ordered, _ = flat.sort(dim=1)
        ranks = torch.arange(1, p + 1, dtype=flat.dtype)
        gini = (2 * (ranks * ordered).sum(dim=1)) / (p * total.squeeze(1)) - (p + 1) / p
        out = gini * p / (p - 1)
    else:
        raise ValueError(f"measure must be 'entropy' or 'gini', got {measure!r}")
    return torch.where(total.squeeze(1) > 0, out, torch.full_like(out, math.nan))


def intervention_specificity(
    source: "WrappedModel | nn.Module | EffectMaps",
    inputs: Any = None,
    site: "str | Site" = "latent.z",
    *,
    measure: Literal["entropy", "gini"] = "entropy",
    over: Literal["elements", "pixels"] = "elements",
    **options: Any,
) -> Result:
    """How concentrated each unit's effect is over the output, in [0, 1] (1: on one element)."""
    maps = _maps(source, inputs, site, options)
    values = _specificity(maps.flat(over), measure)
    return _result(values.numpy(), maps, f"intervention_specificity ({measure})", {"measure": measure, "over": over})


def _abs_correlations(flat: torch.Tensor, similarity: str = "pearson") -> torch.Tensor:
    if similarity not in ("pearson", "cosine"):
        raise ValueError(f"similarity must be 'pearson' or 'cosine', got {similarity!r}")
    centred = flat - flat.mean(dim=1, keepdim=True) if similarity == "pearson" else flat
    norms = centred.norm(dim=1)
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    corr = (centred @ centred.T) / (safe[:, None] * safe[None, :])
    zero = (norms == 0)
    corr[zero, :] = 0.0
    corr[:, zero] = 0.0
    return corr.abs()


def circuit_modularity(
    source: "WrappedModel | nn.Module | EffectMaps",
    inputs: Any = None,
    site: "str | Site" = "latent.z",
    *,
    active: float = 0.01,
    over: Literal["elements", "pixels"] = "elements",
    similarity: Literal["pearson", "cosine"] = "pearson",
    **options: Any,
) -> Result:
    """``1 - mean |corr(E_i, E_j)|`` over pairs of active units (a 0-d :class:`Result`); metadata
    lists the active units and holds the pairwise ``|corr|`` matrix. ``similarity="cosine"`` uses
    the uncentred correlation instead (see the module docstring)."""
    maps = _maps(source, inputs, site, options)
    strength = maps.strength()
    keep = (strength > active * strength.max()).nonzero().squeeze(1) if strength.numel() else strength.long()
    labels = [maps.labels[i] for i in keep.tolist()]
    if len(labels) < 2:
        value = math.nan
        matrix: list = []
    else:
        corr = _abs_correlations(maps.flat(over)[keep], similarity)
        upper = torch.triu_indices(len(labels), len(labels), offset=1)
        value = float(1.0 - corr[upper[0], upper[1]].mean())
        matrix = corr.tolist()
    return _result(value, maps, "circuit_modularity",
                   {"active": active, "over": over, "similarity": similarity, "active_units": labels,
                    "abs_correlation": matrix})


def latent_metrics(
    model: "WrappedModel | nn.Module",
    inputs: Any,
    site: "str | Site" = "latent.z",
    *,
    normalize: Literal["sum", "max"] | None = None,
    measure: Literal["entropy", "gini"] = "entropy",
    over: Literal["elements", "pixels"] = "elements",
    active: float = 0.01,
    similarity: Literal["pearson", "cosine"] = "pearson",
    **options: Any,
) -> dict[str, Any]:
    """All three metrics from one set of effect maps: ``{"maps", "effect_strength", "specificity",
    "modularity"}``."""
    maps = effect_maps(model, inputs, site, **options)
    return {
        "maps": maps,
        "effect_strength": causal_effect_strength(maps, normalize=normalize),
        "specificity": intervention_specificity(maps, measure=measure, over=over),
        "modularity": circuit_modularity(maps, active=active, over=over, similarity=similarity),
    }


# ------------------------------------------------------------------ factor mediation


def _pair_sets(pairs: Any, factors: Sequence[str] | None, n: int, seed: int, split: str) -> dict[str, tuple]:
    """factor -> (clean inputs, counterfactual inputs)."""
    if hasattr(pairs, "pairs") and hasattr(pairs, "factors"):  # a task
        names = list(factors) if factors is not None else list(pairs.factors)
        out = {}
        for f in names:
            drawn = pairs.pairs(n, seed=seed, split=split, factor=f)
            out[f] = (drawn.clean, drawn.corrupt)
        return out
    if isinstance(pairs, Mapping):
        out = {}
        for f, item in pairs.items():
            if factors is not None and f not in factors:
                continue
            if hasattr(item, "clean") and hasattr(item, "corrupt"):
                out[f] = (item.clean, item.corrupt)
            else:
                clean, corrupt = item
                out[f] = (clean, corrupt)
        return out
    raise TypeError(
        "pairs is a task with pairs(n, seed=, split=, factor=) (e.g. ShapesTask), or a mapping "
        "factor -> ImagePairs / (clean inputs, counterfactual inputs)"
    )


def factor_mediation(
    model: "WrappedModel | nn.Module",
    pairs: Any,
    site: "str | Site" = "latent.z",
    *,
    factors: Sequence[str] | None = None,
    n: int = 32,
    seed: int = 0,
    split: str = "train",
    measure: Literal["projection", "distance"] = "projection",
    batch_size: int | None = 1024,
    progress: bool | None = None,
) -> Result:
    """Which units of ``site`` carry each generative factor: a ``factor x unit`` :class:`Result`
    (dims ``("factor", "latent")`` for latent sites, ``("factor", "channel")`` for ``encoder.block.<i>``).

    ``pairs`` is a task (``ShapesTask``: ``n`` pairs per factor drawn with ``seed`` from ``split``) or
    a mapping ``factor -> (clean, counterfactual)`` inputs. Each value is unit ``i``'s share of the
    factor's output change, interchanging that unit from the counterfactual into the clean run (see
    the module docstring for ``measure``). ``metadata["total_effect"]`` holds ``mean |D|`` per factor.
    """
    if measure not in ("projection", "distance"):
        raise ValueError(f"measure must be 'projection' or 'distance', got {measure!r}")
    m = wrap(model)
    sets = _pair_sets(pairs, factors, n, seed, split)
    if not sets:
        raise ValueError("no factors to measure")
    rows, totals, n_pairs, labels, dim, sites = [], {}, {}, None, None, None
    for factor, (clean, counterfactual) in sets.items():
        clean_in, cf_in = m.prepare(clean), m.prepare(counterfactual)
        n_pairs[factor] = rows_of(clean_in)
        sweep = unit_sweep(m, site, clean_in)
        base = execute(m.module, m.adapter, m.catalog, clean_in, capture=[sweep.key])
        source = execute(m.module, m.adapter, m.catalog, cf_in, capture=[sweep.key])
        total = (source.output - base.output).double()
        patch = Patch(source.cache)
        jobs = [[(s, patch)] for s in sweep.sites]
        shares = []
        for _, out in run_jobs(m, clean_in, jobs, batch_size=batch_size, progress=progress,
                               desc=f"mediation of {factor!r} over {len(sweep)} units"):
            d = out.double() - base.output.double().unsqueeze(0)  # [units, n, *output]
            if measure == "projection":
                num = (d * total.unsqueeze(0)).reshape(d.shape[0], -1).sum(dim=1)
                den = (total * total).sum()
            else:
                num = d.abs().reshape(d.shape[0], -1).sum(dim=1)
                den = total.abs().sum()
            shares.append(torch.where(den > 0, num / den.clamp_min(1e-300), torch.full_like(num, math.nan)))
        rows.append(torch.cat(shares))
        totals[factor] = total.abs().mean()
        labels, dim, sites = sweep.labels, sweep.dim, [str(s) for s in sweep.sites]
    metadata = {
        "method": "factor_mediation",
        "metric": f"share of the factor's output change ({measure})",
        "site": str(site), "sites": sites, "measure": measure, "n_pairs": n_pairs, "seed": seed, "split": split,
        "total_effect": {f: float(t) for f, t in totals.items()}, "model": m.describe(), "adapter": m.adapter.name, "versions": collect_versions(),
    }
    return Result(torch.stack([r.cpu() for r in rows]).numpy(), ("factor", dim), {"factor": list(sets), dim: list(labels)}, metadata)
