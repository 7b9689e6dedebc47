"""Causal mediation analysis (Pearl 2001; Vig et al. 2020): how much of the effect of a treatment
(switching clean inputs to corrupt ones) flows through a set of mediator sites.

Per prompt ``i``, with ``y`` the metric:

* total effect          ``TE_i  = y(corrupt) - y(clean)``
* natural indirect effect ``NIE_i = y(clean inputs, mediators := their corrupt values) - y(clean)``
* natural direct effect   ``NDE_i = y(corrupt inputs, mediators held at their clean values) - y(clean)``

When the model is additive in the mediators' and the direct path's contributions (e.g. linear),
``TE = NDE + NIE``; the gap ``TE - NDE - NIE`` (reported as ``interaction``) measures how far it is
from that. Estimates are means over prompts; the confidence intervals are percentile bootstrap
intervals over prompts (``n_boot`` resamples with replacement, seeded, so reproducible).

Cost: 4 forwards (clean and corrupt captures, the two mediator-patched runs); the bootstrap
works on the per-prompt values and runs no model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..engine.forward import Bound, execute
from ..engine.interventions import Patch
from ..results.metrics import Metric, MetricContext
from ..engine.model import WrappedModel
from ..results.result import Result, collect_versions
from ..sites.site import Site
from .pairs import prepare_pair

__all__ = ["Mediation", "mediation"]

EFFECTS = ("TE", "NDE", "NIE")


@dataclass
class Mediation:
    """Estimates (means over prompts), bootstrap CIs and the per-prompt values of TE, NDE, NIE."""

    estimates: dict[str, float]
    ci: dict[str, tuple[float, float]]
    per_prompt: dict[str, np.ndarray]
    level: float
    n_boot: int
    seed: int
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def te(self) -> float:
        return self.estimates["TE"]

    @property
    def nde(self) -> float:
        return self.estimates["NDE"]

    @property
    def nie(self) -> float:
        return self.estimates["NIE"]

    @property
    def interaction(self) -> float:
        """``TE - NDE - NIE``: 0 when the direct and mediated contributions add up."""
        return self.te - self.nde - self.nie

    @property
    def proportion_mediated(self) -> float:
        return self.nie / self.te if self.te != 0 else float("nan")

    def to_result(self) -> Result:
        """A Result with dims ``("effect", "stat")``: effect TE/NDE/NIE, stat estimate/ci_low/ci_high."""
        values = [[self.estimates[e], *self.ci[e]] for e in EFFECTS]
        coords = {"effect": list(EFFECTS), "stat": ["estimate", "ci_low", "ci_high"]}
        meta = {**self.metadata, "level": self.level, "n_boot": self.n_boot, "seed": self.seed}
        return Result(np.array(values), ("effect", "stat"), coords, meta)


def mediation(
    model: "WrappedModel | nn.Module",
    clean: Any,
    corrupt: Any,
    mediators: "str | Site | Sequence[str | Site]",
    metric: "Metric | Callable",
    *,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> Mediation:
    """TE, NDE and NIE of switching ``clean`` to ``corrupt`` through the ``mediators`` (patched jointly)."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}")
    pair = prepare_pair(model, clean, corrupt, metric, "denoising")  # text answers become token ids
    m, metric, clean_in, corrupt_in, n = pair.model, pair.metric, pair.clean, pair.corrupt, pair.n
    items = [mediators] if isinstance(mediators, (str, Site)) else list(mediators)
    sites = [m.catalog.resolve(s, m.adapter.sizes(clean_in)) for s in items]
    patterns = [s for s in sites if s.is_pattern]
    if patterns:
        raise ValueError(f"mediators must be concrete sites (they are patched together), got patterns {patterns}")
    keys = list(dict.fromkeys(s.key for s in sites))

    run = lambda inputs, bounds=(): execute(m.module, m.adapter, m.catalog, inputs, bounds, capture=keys)  # noqa: E731
    clean_run, corrupt_run = run(clean_in), run(corrupt_in)
    to_corrupt, to_clean = Patch(corrupt_run.cache), Patch(clean_run.cache)
    indirect = run(clean_in, [Bound(s, to_corrupt) for s in sites])
    direct = run(corrupt_in, [Bound(s, to_clean) for s in sites])
    ctx = MetricContext(torch.arange(n, device=clean_run.output.device), clean_run.output, clean_in.get("attention_mask"))
    with torch.inference_mode():
        y = {name: metric(r.output, ctx).double().cpu().numpy() for name, r in
             [("clean", clean_run), ("corrupt", corrupt_run), ("indirect", indirect), ("direct", direct)]}
    per_prompt = {"TE": y["corrupt"] - y["clean"], "NDE": y["direct"] - y["clean"], "NIE": y["indirect"] - y["clean"]}

    gen = np.random.default_rng(seed)
    draws = gen.integers(0, n, size=(n_boot, n))
    alpha = (1 - level) / 2
    ci = {}
    for name, vals in per_prompt.items():
        boot = vals[draws].mean(axis=1)
        ci[name] = (float(np.quantile(boot, alpha)), float(np.quantile(boot, 1 - alpha)))
    estimates = {name: float(vals.mean()) for name, vals in per_prompt.items()}
    metadata = {
        "method": "mediation",
        "metric": metric.name,
        "mediators": [str(s) for s in sites],
        "n_prompts": n,
        "model": m.describe(),
        "adapter": m.adapter.name,
        "versions": collect_versions(),
    }
    return Mediation(estimates, ci, per_prompt, level, n_boot, seed, metadata)
