"""Faithfulness of a circuit: how much of the full model's behaviour survives when every candidate
site outside the circuit is ablated.

For inputs ``x``, a candidate set ``C`` (e.g. every head, ``head_out.*[head=*]``), a circuit
``K ⊆ C`` and an ablation kind, with ``y`` the metric averaged over prompts:

    full     = y(model)
    ablated  = y(model with every site of C ablated)
    circuit  = y(model with every site of C \\ K ablated)
    faithfulness = (circuit - ablated) / (full - ablated)

so the whole candidate set gives 1 and the empty circuit 0, by construction. ``kl`` is the mean
KL(full || circuit run) of the output distribution at ``pos`` (``metrics.kl_to_clean``).

Ablation kinds (``reference`` inputs default to ``x`` itself):

* ``zero``      the site's activation set to 0;
* ``mean``      the reference set's mean over prompts *and* positions (positions only when the
                family has a ``pos`` axis);
* ``mean_pos``  the reference set's mean over prompts, per position;
* ``resample``  each prompt takes the activation of a random reference prompt (seeded).

Scores under different ablations differ, often a lot (Miller et al. 2024, "Transformer circuit
faithfulness metrics are not robust"): report the table, not one number.

Cost: one capture forward of the reference inputs, plus one forward per circuit evaluated
(``faithfulness_curve``: one per size; ``faithfulness_table``: one per ablation kind, plus the
shared full run and one all-ablated run per kind).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..engine.adapter import batch_size as rows_of
from ..engine.forward import Bound, execute
from ..engine.interventions import Mean, Resample, Zero
from ..results.metrics import Metric, MetricContext, kl_to_clean
from ..engine.model import WrappedModel, wrap
from ..progress import progress_bar
from ..results.result import Result, collect_versions
from ..sites.site import Site
from .pairs import model_metric

__all__ = ["ABLATIONS", "faithfulness", "faithfulness_table", "faithfulness_curve", "plot_curve"]

ABLATIONS = ("zero", "mean", "mean_pos", "resample")


class _Setup:
    """The shared pieces: wrapped model, candidates, reference cache, full run and metric values."""

    def __init__(self, model, inputs, candidates, metric, reference, seed, pos):
        self.m = wrap(model)
        self.metric = model_metric(self.m, metric)  # text answers become token ids
        self.inputs = self.m.prepare(inputs)
        self.n = rows_of(self.inputs)
        sizes = self.m.adapter.sizes(self.inputs)
        self.sizes = sizes
        self.candidates = list(self.m.catalog.expand(candidates, sizes).sites)
        self.keys = list(dict.fromkeys(s.key for s in self.candidates))
        ref_in = self.inputs if reference is None else self.m.prepare(reference)
        self.reference = execute(self.m.module, self.m.adapter, self.m.catalog, ref_in, capture=self.keys).cache
        self.seed = seed
        full = execute(self.m.module, self.m.adapter, self.m.catalog, self.inputs, capture=self.keys)
        self.full_out = full.output
        self.ctx = MetricContext(torch.arange(self.n, device=full.output.device), full.output, self.inputs.get("attention_mask"))
        self.kl = kl_to_clean(pos)
        self.full = self._score(full.output)
        self._ablated: dict[str, float] = {}

    def _score(self, output) -> float:
        with torch.inference_mode():
            return float(self.metric(output, self.ctx).double().mean())

    def circuit_sites(self, circuit) -> set[Site]:
        items = [circuit] if isinstance(circuit, (str, Site)) else list(circuit)
        out: set[Site] = set()
        for item in items:
            out.update(self.m.catalog.expand(item, self.sizes).sites)
        unknown = out - set(self.candidates)
        if unknown:
            raise ValueError(
                f"circuit sites {sorted(map(str, unknown))} are not among the candidates; give them at the "
                f"candidates' granularity (e.g. head_out.1[head=2] for candidates head_out.*[head=*])"
            )
        return out

    def ablation(self, kind: str):
        if kind == "zero":
            return lambda site: Zero()
        if kind == "resample":
            return lambda site: Resample(self.reference, seed=self.seed)
        if kind in ("mean", "mean_pos"):
            def make(site):
                axes = self.m.catalog.family(site.family).axis_names
                over = ("batch", "pos") if kind == "mean" and "pos" in axes else ("batch",)
                return Mean(self.reference, over=over)
            return make
        raise ValueError(f"unknown ablation {kind!r}; kinds: {', '.join(ABLATIONS)}")

    def run(self, kept: set[Site], kind: str) -> tuple[float, float]:
        """Metric and KL to the full run with every candidate outside ``kept`` ablated."""
        make = self.ablation(kind)
        bounds = [Bound(s, make(s)) for s in self.candidates if s not in kept]
        out = execute(self.m.module, self.m.adapter, self.m.catalog, self.inputs, bounds).output
        with torch.inference_mode():
            kl = float(self.kl(out, self.ctx).double().mean())
        return self._score(out), kl

    def ablated(self, kind: str) -> float:
        if kind not in self._ablated:
            self._ablated[kind] = self.run(set(), kind)[0]
        return self._ablated[kind]

    def normalised(self, value: float, kind: str) -> float:
        gap = self.full - self.ablated(kind)
        return (value - self.ablated(kind)) / gap if gap != 0 else float("nan")

    def metadata(self, method: str, kind, extra: dict) -> dict:
        return {
            "method": method,
            "metric": self.metric.name,
            "ablation": kind,
            "candidates": [str(s) for s in self.candidates],
            "n_prompts": self.n,
            "seed": self.seed,
            "full": self.full,
            **extra,
            "model": self.m.describe(),
            "adapter": self.m.adapter.name,
            "versions": collect_versions(),
        }


def faithfulness(
    model: "WrappedModel | nn.Module",
    inputs: Any,
    circuit: "str | Site | Sequence[str | Site]",
    candidates: "str | Site | Sequence[str | Site]",
    metric: "Metric | Callable",
    *,
    ablation: str = "mean",
    reference: Any = None,
    seed: int = 0,
    pos: int = -1,
) -> Result:
    """The normalised faithfulness of one circuit under one ablation (a 0-d Result).

    ``metadata`` holds ``full``, ``ablated``, ``circuit`` (metric means) and ``kl``.
    """
    s = _Setup(model, inputs, candidates, metric, reference, seed, pos)
    value, kl = s.run(s.circuit_sites(circuit), ablation)
    meta = s.metadata("faithfulness", ablation, {"ablated": s.ablated(ablation), "circuit": value, "kl": kl})
    return Result(np.array(s.normalised(value, ablation)), (), {}, meta)


def faithfulness_table(
    model: "WrappedModel | nn.Module",
    inputs: Any,
    circuit: "str | Site | Sequence[str | Site]",
    candidates: "str | Site | Sequence[str | Site]",
    metric: "Metric | Callable",
    *,
    ablations: Sequence[str] = ABLATIONS,
    reference: Any = None,
    seed: int = 0,
    pos: int = -1,
) -> Result:
    """One circuit under every ablation kind side by side: a Result with dims ``("ablation",)``.

    ``metadata["kl"]``, ``["ablated"]`` and ``["circuit"]`` map each kind to its KL and metric means.
    """
    s = _Setup(model, inputs, candidates, metric, reference, seed, pos)
    kept = s.circuit_sites(circuit)
    values, kls, raw = [], {}, {}
    for kind in ablations:
        value, kls[kind] = s.run(kept, kind)
        raw[kind] = value
        values.append(s.normalised(value, kind))
    meta = s.metadata(
        "faithfulness_table", list(ablations),
        {"kl": kls, "circuit": raw, "ablated": {k: s.ablated(k) for k in ablations}},
    )
    return Result(np.array(values), ("ablation",), {"ablation": list(ablations)}, meta)


def faithfulness_curve(
    model: "WrappedModel | nn.Module",
    inputs: Any,
    ranking: "Sequence[str | Site] | Result",
    candidates: "str | Site | Sequence[str | Site]",
    metric: "Metric | Callable",
    *,
    ablation: str = "mean",
    sizes: Sequence[int] | None = None,
    reference: Any = None,
    seed: int = 0,
    pos: int = -1,
    progress: bool | None = None,
) -> Result:
    """Faithfulness against circuit size, adding sites in ``ranking`` order (dims ``("size",)``).

    ``ranking`` is a list of sites, best first, or a Result over the candidates' sweep (e.g. from
    ``attribution_patching``), ranked by ``|value|``. ``sizes`` defaults to ``0..len(ranking)``.
    ``metadata["kl"]`` holds the KL at each size. Draw it with :func:`plot_curve`.
    """
    s = _Setup(model, inputs, candidates, metric, reference, seed, pos)
    if isinstance(ranking, Result):
        if len(ranking.values.reshape(-1)) != len(s.candidates):
            raise ValueError(
                f"the ranking Result has {ranking.values.size} values but there are {len(s.candidates)} candidates; "
                f"rank the same sweep"
            )
        order = np.argsort(-np.abs(ranking.values.reshape(-1)), kind="mergesort")
        ranked = [s.candidates[i] for i in order]
    else:
        ranked = [s.m.catalog.resolve(r, s.sizes) for r in ranking]
        s.circuit_sites(ranked)
    sizes = list(range(len(ranked) + 1)) if sizes is None else [int(k) for k in sizes]
    values, kls = [], []
    for k in progress_bar(sizes, progress, desc="faithfulness curve"):
        value, kl = s.run(set(ranked[:k]), ablation)
        values.append(s.normalised(value, ablation))
        kls.append(kl)
    meta = s.metadata("faithfulness_curve", ablation, {"ablated": s.ablated(ablation), "kl": kls, "ranking": [str(r) for r in ranked]})
    return Result(np.array(values), ("size",), {"size": sizes}, meta)


def plot_curve(curve: Result, ax=None, *, title: str | None = None, kl: bool = True):
    """Line plot of a :func:`faithfulness_curve` (and its KL on a second axis); returns the Figure."""
    from matplotlib.figure import Figure

    if ax is None:
        figure = Figure(figsize=(5, 3.2), layout="constrained")
        ax = figure.add_subplot()
    figure = ax.figure
    sizes = curve.coords["size"]
    ax.plot(sizes, curve.values, marker="o", color="C0", label="faithfulness")
    ax.axhline(1.0, color="0.6", lw=0.8, ls="--")
    ax.axhline(0.0, color="0.6", lw=0.8)
    ax.set_xlabel("circuit size (sites kept)")
    ax.set_ylabel("faithfulness", color="C0")
    if kl and "kl" in curve.metadata:
        twin = ax.twinx()
        twin.plot(sizes, curve.metadata["kl"], marker=".", color="C3", label="KL(full || circuit)")
        twin.set_ylabel("KL to full", color="C3")
    ax.set_title(title or f"faithfulness ({curve.metadata.get('ablation', '')} ablation)")
    return figure
