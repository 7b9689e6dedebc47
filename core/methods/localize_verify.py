"""Exact activation patching of sites chosen a round at a time, for :func:`~crosspatch.methods.localize.localize`.

``activation_patching`` makes the clean and corrupt runs on every call, so a localisation verifying in
``r`` rounds paid ``2 r`` forwards for the same two runs. :class:`Verifier` makes them once, capturing
every site any round may patch, or takes the attribution call's own base and source runs of the pair
(:class:`~crosspatch.methods.attribution.BaseAndSource`: its gradient forward kept a prefix), and each :meth:`Verifier.patch` call runs only the patched forwards,
planned as ``activation_patching`` plans them: the same engine calls, sites whose source value equals
the base run's skipped (effect exactly 0), sites sharing a start batched into forwards by the engine's
cost model on a CPU (:func:`~crosspatch.methods.activation_patching.plan_sweep`), with one prompt a batch's later sites
joining its forward at their own block (:data:`~crosspatch.methods.activation_patching.JOIN_ROWS`). A site's value is that function's
for the site within float rounding (which sites share a forward changes the last bits).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..engine.adapter import repeat_rows
from ..engine.forward import Bound, execute
from ..engine.interventions import Patch
from ..results.metrics import MetricContext
from ..sites.site import Site, Span
from .activation_patching import first_differences, plan_sweep, source_run
from .attribution import BaseAndSource
from .pairs import Pair, check_gap, same_masks

__all__ = ["Verifier"]

# With one prompt a round's later sites join its forward at their own block, as the sweep's do (when the sweep
# joins: activation_patching.JOIN_ROWS). False: every site of a batch runs from the batch's first block (for
# measuring what joining saves).
JOIN_ROWS = True
# The clean and corrupt runs are the attribution call's own when it hands them over (``runs``): no runs of its own.
# False: the verifier makes its own two runs (for measuring what sharing saves).
SHARE_RUNS = True


class Verifier:
    """The clean and corrupt runs of ``pair``, made once, capturing ``sites`` (every site a round may patch), or
    ``runs``, an attribution call's of the same pair, when they hold those sites and a prefix; :meth:`patch` gives
    activation patching's values for any of them. ``forwards`` counts the model runs made so far as localize
    counts them (rows / prompts): the two baselines when made here, and one per site run."""

    def __init__(self, pair: Pair, sites: Sequence[str], *, direction: str, normalize: bool,
                 batch_size: int | None, reuse_prefix: bool, runs: BaseAndSource | None = None) -> None:
        m, n = pair.model, pair.n
        self.pair, self.normalize, self.batch_size = pair, normalize, batch_size
        keys = list(dict.fromkeys(m.catalog.through_source(Site.parse(s)).key for s in sites))
        reuse = reuse_prefix and m.adapter.can_resume(m.module)
        self.ctx = MetricContext(torch.arange(n), None, pair.base.get("attention_mask"))
        self.at = pair.metric.positions(self.ctx, pair.sizes)
        source_at = self.at if same_masks(pair.source, pair.base) else None
        self.forwards = 2
        if runs is not None and reuse and SHARE_RUNS and all(k in runs.base.cache and k in runs.source for k in keys):
            # the attribution call's runs of the same pair: its gradient forward kept a prefix, and its source
            # run took the base run's values before the first difference, as source_run does
            self.base, self.source, self.forwards = runs.base, runs.source, 0
            source_out = runs.source_output
        else:
            self.base = execute(m.module, m.adapter, m.catalog, pair.base, capture=keys, keep_prefix=reuse,
                                output_at=self.at)
            source_out, self.source = source_run(m, pair.source, pair.base, self.base, keys, source_at, reuse)
        clean_out, corrupt_out = (source_out, self.base.output) if direction == "denoising" else (self.base.output, source_out)
        self.ctx.example, self.ctx.clean = self.ctx.example.to(clean_out.device), clean_out
        with torch.inference_mode():
            clean_metric, corrupt_metric = pair.metric(clean_out, self.ctx), pair.metric(corrupt_out, self.ctx)
        self.baseline = corrupt_metric if direction == "denoising" else clean_metric
        self.gap = (clean_metric - corrupt_metric).double().mean()
        if normalize:
            check_gap(float(clean_metric.double().mean()), float(corrupt_metric.double().mean()), pair.metric.name)

    def runs(self, sites: Sequence[str]) -> int:
        """How many of ``sites`` activation patching would run (the rest are skipped as unchanged); no forward.
        ``2 + runs(every site of a sweep)`` is that sweep's forwards as localize counts them."""
        return len(sites) - sum(self.unchanged(sites))

    def unchanged(self, sites: Sequence[str]) -> list[bool]:
        """Per site, whether its source value equals the base run's, so that patching it changes nothing (its effect
        is exactly 0, and :meth:`patch` skips it); no forward."""
        _, differs = self._differences(sites)
        return [first is None for first in differs]

    def _differences(self, sites: Sequence[str]) -> tuple[list[Site], list[int | None]]:
        """``sites`` as patched (through their family's linear source) and where each one's source value first
        differs from the base run's (None: nowhere, the site is skipped)."""
        m, prefix = self.pair.model, self.base.prefix
        patched = [m.catalog.through_source(site) for site in m.catalog.expand(list(sites), self.pair.sizes).sites]
        return patched, first_differences(m, patched, self.source, self.base.cache, prefix is not None and prefix.causal)

    def patch(self, sites: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Each site's effect (``activation_patching``'s value: the mean over prompts of the metric's change,
        divided by the gap with ``normalize``) and whether it was skipped as unchanged."""
        pair, m, n = self.pair, self.pair.model, self.pair.n
        patched, differs = self._differences(sites)
        todo = [i for i, first in enumerate(differs) if first is not None]
        patched = [s if not differs[i] else s.with_(pos=Span(differs[i], None)) for i, s in enumerate(patched)]
        effects = torch.zeros(len(patched), dtype=torch.float64)
        patch = Patch(self.source)
        for members, resume in plan_sweep(m, [patched[i] for i in todo], n, self.batch_size, self.base.prefix,
                                          join=JOIN_ROWS):
            members = [todo[j] for j in members]
            inputs = repeat_rows(pair.base, len(members))
            bounds = [Bound(patched[i], patch, slice(j * n, (j + 1) * n)) for j, i in enumerate(members)]
            run = execute(m.module, m.adapter, m.catalog, inputs, bounds, resume=resume,
                          output_at=None if self.at is None else self.at.repeat(len(members)))
            rows = MetricContext(self.ctx.example.repeat(len(members)), self.ctx.clean, inputs.get("attention_mask"))
            with torch.inference_mode():
                change = (pair.metric(run.output, rows).view(len(members), n) - self.baseline).double().mean(dim=1)
            effects[members] = change.cpu()
        self.forwards += len(todo)
        if self.normalize:
            effects = effects / self.gap.cpu()
        skipped = np.ones(len(patched), dtype=bool)
        skipped[todo] = False
        return effects.numpy(), skipped
