"""Coarse-to-fine localisation (``cp.localize``): attribution patching (AtP) ranks the sites of every level,
exact activation patching verifies them, level by level, until no unverified site can matter by the rule
below.

Levels, coarse to fine (``start="components"``; ``docs/localize.md`` has the rule in full):

``layer``          ``attn_out.L``, ``mlp_out.L``                       (``resid_pre.L`` with ``start="resid"``)
``layer_pos``      ``attn_out.L[pos=p]``, ``mlp_out.L[pos=p]``         (``resid_pre.L[pos=p]``)
``component``      ``head_out.L[head=h]``, ``mlp_out.L``
``component_pos``  ``head_out.L[pos=p,head=h]``, ``mlp_out.L[pos=p]``
``neuron``         ``mlp_act.L[pos=p,neuron=i]`` (``neurons=True``)

The default walk is ``layer``, ``layer_pos``, ``component_pos``: whole heads (``component``) are walked
when ``levels`` names them. Measured (``benchmarks/localize.md``), the whole-head level cost forwards
almost everywhere and found nothing the (layer, position) parents did not: on IOI models trained here, whose
heads act at one or two positions, a whole head spans every position from the first difference and its
bound reaches the threshold for most heads; on the planted models and tracr's programs every recall stayed
the same without it, for fewer forwards in all cases but one (``docs/localize.md`` has the numbers).

One AtP call (``attribution_patching``; with ``estimator="atp*"`` AtP*'s GradDrop, ``grad_drop=True``)
estimates every site of every level. Plain AtP is the default: it is linear in each site's activation, so
a parent's estimate is the sum of its children's and a parent's unexplained part (below) is AtP's own
error on the parent; GradDrop's scores are not additive, cost ``L + 1`` row blocks of the gradient forward
instead of one, and, measured on planted models (``benchmarks/localize.md``), made localisation verify more
for no recall. A site
listed at two levels (``mlp_out.L`` is a layer and a component) is one site, verified at most once, and a
candidate at both. A site's *parents* are the coarser sites it is a summand of: ``attn_out.L[pos=p]`` of
``attn_out.L``, ``head_out.L[head=h]`` of ``attn_out.L``, ``head_out.L[pos=p,head=h]`` of
``attn_out.L[pos=p]`` and of ``head_out.L[head=h]``, ``mlp_out.L[pos=p]`` of ``mlp_out.L``,
``mlp_act.L[pos=p,neuron=i]`` of ``mlp_out.L[pos=p]`` (the residual stream of ``start="resid"`` is no sum
of finer sites, so it is a parent of nothing).

The rule, per level, with ``scale`` the clean-corrupt gap ``|metric(clean) - metric(corrupt)|`` (1 with
``normalize``) and ``tau = tol * scale``:

* the *threshold* is ``tau``; with ``k``, ``max(tau, the k_l-th largest |exact effect| among the level's
  sites)`` once ``k_l`` of them are verified. At the finest walked level ``k_l = k``; at a coarser one it
  is how many of its sites are among the finest level's ``k`` largest estimates or their ancestors (at
  least one): the coarse levels are there to verify about as many sites as the likely top ``k`` have
  parents there and to find what the estimates miss, not to rank ``k`` sites of their own;
* a site's *bound* is ``|estimate| * (1 + rho)``, ``rho`` the :data:`ERROR_QUANTILE` quantile of the estimator's
  relative errors ``|exact - estimate| / |estimate|`` on the verified sites of its family at this level
  with ``|estimate| >= tau`` (the level's, then every level's, while the family has fewer than three);
* a verified parent's *unexplained part* is ``|exact(P) - sum of its children at this level|``, a child
  counted by its exact effect when verified, by its estimate otherwise; once a *rest test* (the parent's
  unverified children patched together as one site, ``attn_out.0[pos={10,12,13}]``) holds every unverified
  child, its exact effect stands for the parent's: the patched children's interactions no longer count;
* the ``layer`` level verifies all its sites, whatever AtP says (the anchor: AtP can be blind to a
  whole layer). At every other level a round verifies: while fewer than ``k_l`` of the level's sites, or
  fewer than three of a family's, are verified, the largest bounds that make them up (they set the
  threshold and ``rho``); after that every unverified site whose bound reaches the threshold, and, of
  every parent whose unexplained part plus its likeliest unverified child's bound reaches the threshold,
  one rest test (once some of its children are patched, and at least :data:`REST_MIN` are not), then as
  many more unverified children (largest bound first) as it has patched ones, at least one. With ``k`` a
  round takes first only what reaches the threshold the level is heading for (the ``k_l``-th largest
  effect, exact where verified, estimated elsewhere), the rest once the exact values have raised the
  threshold or not. At the finest walked level the unexplained part is first reduced by the error
  allowances (bound minus ``|estimate|``) of that child's unverified siblings. A site whose patch changes
  nothing (before the first difference) is 0 without a forward. The level stops when a round would verify
  nothing; each round verifies a site or makes a parent's one rest test, so it stops.

``tol=0`` (and no ``k``) verifies every site: the result is the exhaustive sweep's. Verified values are
``activation_patching``'s for those sites within float rounding: each round patches into one clean and one
corrupt run (:class:`~crosspatch.methods.localize_verify.Verifier`) as that function does; they are AtP's own
base and source runs when its gradient forward kept a prefix (a causal model, the pair sharing its first
position), else made once at the first round.

Forwards are counted as rows through the model divided by the number of prompts (a forward of ``n``
prompts is one, however rows are batched), a backward as two forwards: AtP costs ``3 + 1`` (the gradient
forward, its backward, the source run), AtP* with GradDrop over ``L`` layer groups ``3 (L + 1) + 1`` (a
gradient forward of ``(L + 1) n`` rows), the verification one per site run, plus ``2`` (the clean and
corrupt runs) when it cannot use AtP's. The exhaustive sweep, one ``activation_patching`` call, is counted the same way:
``2 + metadata["sites_run"]``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Literal, Sequence

import numpy as np
from torch import nn

from ..engine.model import WrappedModel
from ..progress import progress_bar
from ..results.metrics import Metric
from ..results.result import Result, collect_versions
from ..sites.site import Site
from .attribution import BaseAndSource, attribution_patching
from .localize_verify import Verifier
from .pairs import label_positions, prepare_pair

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["localize", "Localization", "LEVELS", "level_patterns", "atp_forwards", "patching_forwards"]

#: The levels, coarse to fine.
LEVELS = ("layer", "layer_pos", "component", "component_pos", "neuron")
_DEFAULT = ("layer", "layer_pos", "component_pos")  # ``component`` when asked (module docstring)
_RESID_LEVELS = ("layer", "layer_pos")
#: Relative errors needed at a level before its own quantile replaces the one of every level so far.
_OWN_ERRORS = 3
#: The quantile of the estimator's relative errors that inflates every estimate (``rho``).
ERROR_QUANTILE = 0.9
#: With ``k``, a round verifies first the sites that reach the threshold the level is heading for (see
#: ``_pick``). False: every site reaching the current threshold at once (for measuring what it saves).
RISING = True
#: A verified parent left unexplained has its unverified children patched together, as one site, before any of
#: them is verified one by one (a *rest test*, see ``_more_children``). False: children only (for measuring).
REST_TESTS = True
#: The fewest unverified children a rest test is made for (fewer are verified as they are).
REST_MIN = 3
#: True: a rest test's unexplained part is reduced by its unverified members' error allowances, as at the finest
#: level (fewer forwards where many children err the same way, but it lost a top-10 site on a saturated GPT-2
#: model; ``docs/localize.md``). Off by default; for measuring.
REST_ALLOWANCE = False
#: A rest test's unexplained part counts only where it is below the parent's own: a rest of many children that AtP
#: all underestimates a little can have a larger one than the parent, whose patched children's interaction partly
#: cancelled it, and would send the search through every child. False: the rest's alone (for measuring).
REST_MIN_D = True


def level_patterns(level: str, start: str = "components", layers: int | None = None) -> list[str]:
    """The site patterns of ``level``; ``layers`` (the model's depth) names ``start="resid"``'s last
    residual, ``resid_post`` of the last layer."""
    if level in _RESID_LEVELS and start == "resid":
        if layers is None:
            raise ValueError("start='resid' needs the number of layers to name the last residual")
        pos = "[pos=*]" if level == "layer_pos" else ""
        return [f"resid_pre.*{pos}", f"resid_post.{layers - 1}{pos}"]
    return {
        "layer": ["attn_out.*", "mlp_out.*"],
        "layer_pos": ["attn_out.*[pos=*]", "mlp_out.*[pos=*]"],
        "component": ["head_out.*[head=*]", "mlp_out.*"],
        "component_pos": ["head_out.*[pos=*,head=*]", "mlp_out.*[pos=*]"],
        "neuron": ["mlp_act.*[pos=*,neuron=*]"],
    }[level]


def atp_forwards(result: Result) -> int:
    """Forwards an ``attribution_patching`` call spent, from its metadata: the gradient forward of one row
    block per GradDrop group plus one, its backward (two forwards) and the source run; ``qk_fix`` is not
    counted (localize does not use it)."""
    blocks = 1 + len(result.metadata.get("grad_drop_groups") or [])
    return 3 * blocks + 1


def patching_forwards(result: Result) -> int:
    """Forwards an ``activation_patching`` call (the exhaustive sweep) spent: the clean and corrupt runs and
    one per site run; counted as localize counts its own."""
    return 2 + int(result.metadata["sites_run"])


@dataclass
class _Unit:
    site: str
    family: str
    level: str  # the first walked level that lists it
    estimate: float
    parents: list[str] = field(default_factory=list)
    value: float | None = None
    skipped: bool = False

    @property
    def best(self) -> float:
        return self.estimate if self.value is None else self.value


def _parents(site: Site) -> list[str]:
    """The coarser sites ``site`` is a summand of (see the module docstring)."""
    fam, layer, sel = site.family, site.layer, site.selection
    pos, head = sel.get("pos"), sel.get("head")
    if fam in ("attn_out", "mlp_out") and pos is not None:
        return [f"{fam}.{layer}"]
    if fam == "head_out":
        if pos is None:
            return [f"attn_out.{layer}"]
        return [f"attn_out.{layer}[pos={pos}]", f"head_out.{layer}[head={head}]"]
    if fam == "mlp_act":
        return [f"mlp_out.{layer}[pos={pos}]"]
    return []


@dataclass
class _Group:
    """A verified parent's children in ``members`` patched together as one site (a rest test): its exact
    effect, next to the sum of theirs, says whether they hold what the parent's other children leave
    unexplained."""

    site: str
    members: frozenset[str]
    value: float | None = None


def _group_site(kids: list[_Unit]) -> str | None:
    """The site patching ``kids`` (children of one parent at one level) at once: their common site with the one
    axis they differ along selecting all of them (``head_out.3[pos=9,head={1,4,6}]``); None if they are not of
    one family, or differ along more than one axis."""
    sites = [Site.parse(u.site) for u in kids]
    first = sites[0]
    if len(kids) < 2 or any(s.family != first.family or s.layer != first.layer or s.selection.keys()
                            != first.selection.keys() for s in sites):
        return None
    axes = [a for a in first.selection if len({s.selection[a] for s in sites}) > 1]
    if len(axes) != 1 or not all(isinstance(s.selection[axes[0]], int) for s in sites):
        return None
    return str(first.with_(**{axes[0]: sorted(s.selection[axes[0]] for s in sites)}))


@dataclass(repr=False)
class Localization:
    """What :func:`localize` found: per level a Result over its sites, the AtP estimates and the cost.

    ``levels[name]`` has dims ``("site",)``: the exact effect where the site was verified, the AtP estimate
    elsewhere; its metadata says which (``verified``, ``estimate``, ``skipped``: lists over the sites) and
    how the level went (``rounds``, ``threshold``, ``rho`` per family, ``verified_count``,
    ``max_unverified_bound``, ``unverified_mass`` (their sum), ``max_unexplained``, ``forwards``).
    ``sweeps[pattern]`` is the same for one pattern with its own dims (``head_out.*[pos=*,head=*]``:
    layer, pos, head), comparable with ``activation_patching`` of the pattern. ``forwards`` is the total
    spent (rows / prompts; a backward counts two) and ``metadata["cost"]`` its parts.
    """

    levels: dict[str, Result]
    sweeps: dict[str, Result]
    estimates: Result
    forwards: int
    metadata: dict[str, Any]

    def __getitem__(self, level: str) -> Result:
        if level not in self.levels:
            raise KeyError(f"no level {level!r}; this localisation walked {list(self.levels)}")
        return self.levels[level]

    def __repr__(self) -> str:
        parts = [f"{name}: {r.metadata['verified_count']}/{r.values.size} verified" for name, r in self.levels.items()]
        return f"Localization({'; '.join(parts)}; {self.forwards} forwards)"

    @property
    def verified(self) -> dict[str, float]:
        """Every site patched exactly, with its effect, and every site known unchanged (a position before the
        first difference: 0 without a forward)."""
        out: dict[str, float] = {}
        for res in self.levels.values():
            for site, value, done in zip(res.coords["site"], res.values, res.metadata["verified"]):
                if done:
                    out[site] = float(value)
        return out

    def sweep(self, pattern: str) -> Result:
        """The Result of one pattern (``"head_out.*[pos=*,head=*]"``) with its own dims."""
        if pattern not in self.sweeps:
            raise KeyError(f"no pattern {pattern!r}; patterns: {list(self.sweeps)}")
        return self.sweeps[pattern]

    def to_pandas(self) -> "pd.DataFrame":
        """One row per site and level: level, site, estimate, value (exact if verified), verified, skipped."""
        import pandas as pd

        rows = []
        for name, res in self.levels.items():
            meta = res.metadata
            for i, site in enumerate(res.coords["site"]):
                rows.append({"level": name, "site": site, "estimate": meta["estimate"][i], "value": res.values[i],
                             "verified": meta["verified"][i], "skipped": meta["skipped"][i]})
        return pd.DataFrame(rows)

    def plot(self, k: int | None = None, *, title: str | None = None) -> Any:
        """The (layer, position) maps and the finest level's top ``k``, patched or estimated (a matplotlib
        Figure; :func:`~crosspatch.methods.localize_plot.plot_localization`)."""
        from .localize_plot import plot_localization

        return plot_localization(self, k, title=title)

    def top(self, k: int = 10, level: str | None = None) -> "pd.DataFrame":
        """The ``k`` sites of ``level`` (default: the finest walked) with the largest ``|value|``."""
        level = level or list(self.levels)[-1]
        frame = self.to_pandas()
        frame = frame[frame["level"] == level]
        return frame.iloc[np.argsort(-np.abs(frame["value"].to_numpy()), kind="stable")[:k]].reset_index(drop=True)


def localize(
    model: "WrappedModel | nn.Module",
    clean: Any,
    corrupt: Any,
    metric: "Metric | Callable",
    *,
    tol: float = 0.02,
    k: int | None = None,
    start: Literal["components", "resid"] = "components",
    levels: Sequence[str] | None = None,
    neurons: bool = False,
    direction: Literal["denoising", "noising"] = "denoising",
    normalize: bool = False,
    batch_size: int | None = None,
    reuse_prefix: bool = True,
    estimator: Literal["atp", "atp*"] = "atp",
    progress: bool | None = None,
) -> Localization:
    """Walk from layers to (layer, position), then head-position and MLP-position (and neurons), ranking
    each level by AtP and verifying with exact activation patching until no unverified site's bound
    reaches the threshold: ``tol`` times the clean-corrupt gap, and with ``k`` at least the ``k``-th
    largest exact effect of the finest level (``k`` is how many sites of the finest level you want ranked
    exactly; a coarser level ranks as many of its sites as hold the finest level's ``k`` likeliest).

    ``levels`` picks levels out of :data:`LEVELS` (default: ``layer``, ``layer_pos``, ``component_pos``;
    ``neurons=True`` adds ``neuron``; whole heads, ``component``, only when named); ``levels=["component_pos"]``
    is AtP verified without the coarser levels. ``estimator="atp*"`` ranks by AtP* with GradDrop instead of
    plain AtP (``"atp"``). ``start="resid"``
    makes the first two levels the residual stream (``resid_pre.L``, ``resid_pre.L[pos=p]`` and the last
    layer's ``resid_post``) instead of the attention and MLP writes. ``direction``, ``normalize``,
    ``batch_size`` and ``reuse_prefix`` mean what they mean to ``activation_patching``, whose values the
    verified sites get, and the first two are passed to ``attribution_patching``. ``tol=0`` without ``k`` verifies every site. Returns a
    :class:`Localization`; the module docstring and ``docs/localize.md`` give the rule and the cost count.
    """
    if not tol >= 0:
        raise ValueError(f"tol must be >= 0 (a fraction of the clean-corrupt gap), got {tol!r}")
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise ValueError(f"k must be a positive int or None, got {k!r}")
    if estimator not in ("atp", "atp*"):
        raise ValueError(f"estimator must be 'atp' (attribution patching) or 'atp*' (with GradDrop), got {estimator!r}")
    if start not in ("components", "resid"):
        raise ValueError(f"start must be 'components' or 'resid', got {start!r}")
    walked = _walked(levels, neurons)

    pair = prepare_pair(model, clean, corrupt, metric, direction)
    m, metric = pair.model, pair.metric
    layers = next((m.catalog.family(f).layers for f in ("resid_pre", "attn_out") if f in m.catalog), None)
    patterns = {lv: [p for p in level_patterns(lv, start, layers) if Site.parse(p).family in m.catalog]
                for lv in walked}
    missing = [lv for lv in walked if not patterns[lv]]
    if missing:
        raise ValueError(
            f"{m.catalog.model_name} has none of the site families of level(s) {missing} "
            f"({', '.join(p for lv in missing for p in level_patterns(lv, start, layers))})"
        )
    unique = list(dict.fromkeys(p for lv in walked for p in patterns[lv]))
    common = dict(direction=direction, normalize=normalize)

    runs: list[BaseAndSource] = []  # AtP's base and source runs, which the verification patches into
    estimates = attribution_patching(m, clean, corrupt, unique, metric, grad_drop=estimator == "atp*", keep_runs=runs,
                                     **common)
    cost = {"attribution": atp_forwards(estimates), "baseline_runs": 0, "patched_sites": 0}
    baseline = estimates.metadata["baseline"]
    scale = 1.0 if normalize else abs(baseline["clean"] - baseline["corrupt"])
    tau = tol * scale
    if tau == 0 and tol > 0 and k is None:
        warnings.warn(f"the clean-corrupt gap of {metric.name} is 0, so tol={tol} is 0 too: every site is verified",
                      stacklevel=2)

    # Sites of each pattern in the order AtP returned them (expand concatenates the patterns' sweeps).
    sweeps = {p: pair.expand(p) for p in unique}
    names, values, offset = {}, {}, 0
    for p in unique:
        names[p] = estimates.coords["site"][offset : offset + len(sweeps[p])]
        values[p] = estimates.values[offset : offset + len(sweeps[p])]
        offset += len(sweeps[p])
    units: dict[str, _Unit] = {}
    for lv in walked:
        for p in patterns[lv]:
            for name, site, value in zip(names[p], sweeps[p].sites, values[p]):
                if name not in units:
                    units[name] = _Unit(name, site.family, lv, float(value), _parents(site))
    order = {lv: i for i, lv in enumerate(walked)}
    for unit in units.values():  # a parent counts when it is walked at an earlier level
        unit.parents = [q for q in unit.parents if q in units and order[units[q].level] < order[unit.level]]

    verifier: list[Verifier] = []  # made at the first round: the clean and corrupt runs, once

    groups: dict[str, list[_Group]] = {}  # rest tests made, by parent

    def verify(todo: list[_Unit], tests: list[tuple[str, _Group]] = ()) -> None:
        if not verifier:
            verifier.append(Verifier(pair, list(units), direction=direction, normalize=normalize,
                                     batch_size=batch_size, reuse_prefix=reuse_prefix, runs=runs[0] if runs else None))
            runs.clear()
            cost["baseline_runs"] += verifier[0].forwards
            # a site whose patch changes nothing (a position before the first difference) is known, 0, for free
            for u, same in zip(units.values(), verifier[0].unchanged(list(units))):
                if same and u.value is None:
                    u.value, u.skipped = 0.0, True
        before = verifier[0].forwards
        values, skipped = verifier[0].patch([u.site for u in todo] + [g.site for _, g in tests])
        for u, value, skip in zip(todo, values, skipped):
            u.value, u.skipped = float(value), bool(skip)
        for (parent, g), value in zip(tests, values[len(todo):]):
            g.value = float(value)
            groups.setdefault(parent, []).append(g)
        cost["patched_sites"] += verifier[0].forwards - before

    finest = [units[name] for name in _level_sites(walked[-1], patterns, names)]
    stats: dict[str, dict[str, Any]] = {}
    bar = progress_bar(walked, progress, desc="localize", unit="level")
    for lv in bar:
        before = _total(cost)
        listed = [units[name] for name in _level_sites(lv, patterns, names)]
        families = list(dict.fromkeys(u.family for u in listed))
        rounds = rests = 0
        level_k = _level_k(k, listed, finest, units) if lv != walked[-1] else k
        while True:
            threshold = _threshold(tau, listed, level_k)
            rhos = {f: _rho([u for u in listed if u.family == f], listed, units.values(), tau) for f in families}
            bounds = {u.site: abs(u.estimate) * (1 + rhos[u.family]) for u in listed}
            unexplained = _unexplained(listed, units, groups)
            if lv == "layer":  # the anchor: every layer, whatever AtP says (it can be blind to a whole layer)
                todo, tests = [u for u in listed if u.value is None], []
            else:
                todo, tests = _pick(listed, families, bounds, threshold, level_k, unexplained, lv == walked[-1])
            if not todo and not tests:
                break
            verify(todo, tests)
            rests += len(tests)
            rounds += 1
        rest = [bounds[u.site] for u in listed if u.value is None]
        stats[lv] = {
            "rounds": rounds, "rest_test_count": rests, "threshold": float(threshold),
            "verified_count": sum(units[n].value is not None for n in _level_sites(lv, patterns, names)),
            "patched_count": sum(_ran(units[n]) for n in _level_sites(lv, patterns, names)),
            "max_unverified_bound": float(max(rest, default=0.0)), "unverified_mass": float(sum(rest)),
            "max_unexplained": float(max((d for d, *_ in unexplained.values()), default=0.0)),
            "rho": {f: float(r) for f, r in rhos.items()},
            "forwards": _total(cost) - before,
        }

    forwards = _total(cost)
    # What the exhaustive sweep of the finest level would cost, counted the same way (no forward: the verifier's
    # clean and corrupt runs say which sites it would skip); None when nothing was verified.
    sweep_forwards = 2 + verifier[0].runs([u.site for u in finest]) if verifier else None
    metadata = {
        "method": "localize",
        "metric": metric.name,
        "direction": direction,
        "normalize": normalize,
        "tol": tol,
        "k": k,
        "start": start,
        "estimator": estimator,
        "levels": list(walked),
        "patterns": {lv: patterns[lv] for lv in walked},
        "scale": scale,
        "tau": tau,
        "baseline": baseline,
        "n_prompts": pair.n,
        "forwards": forwards,
        "sweep_forwards": sweep_forwards,
        "cost": dict(cost),
        "rest_tests": {g.site: g.value for tests in groups.values() for g in tests},
        "model": m.describe(),
        "adapter": m.adapter.name,
        "versions": collect_versions(),
    }
    level_results = {}
    for lv in walked:
        sites = [units[n] for n in _level_sites(lv, patterns, names)]
        level_results[lv] = Result(
            np.array([u.best for u in sites]), ("site",), {"site": [u.site for u in sites]},
            {**_unit_lists(sites), **stats[lv], "level": lv, "method": "localize", "metric": metric.name, "tol": tol,
             "k": k},
        )
    labels = m.position_labels(pair.clean)
    pattern_results = {}
    for p in unique:
        sweep, sites = sweeps[p], [units[n] for n in names[p]]
        lists = {key: np.array(value).reshape(sweep.shape).tolist() for key, value in _unit_lists(sites).items()}
        pattern_results[p] = Result(
            np.array([u.best for u in sites]).reshape(sweep.shape), sweep.dims,
            label_positions(dict(sweep.coords), labels), {**lists, "pattern": p, "method": "localize",
                                                           "metric": metric.name, "tol": tol, "k": k},
        )
    return Localization(level_results, pattern_results, estimates, forwards, metadata)


def _walked(levels: Sequence[str] | None, neurons: bool) -> tuple[str, ...]:
    if levels is None:
        return _DEFAULT + (("neuron",) if neurons else ())
    if isinstance(levels, str):
        levels = [levels]
    unknown = [lv for lv in levels if lv not in LEVELS]
    if unknown or not levels:
        raise ValueError(f"levels must name some of {list(LEVELS)}; got {list(levels)}")
    chosen = set(levels) | ({"neuron"} if neurons else set())
    return tuple(lv for lv in LEVELS if lv in chosen)


def _level_sites(level: str, patterns: dict[str, list[str]], names: dict[str, list[str]]) -> list[str]:
    return [n for p in patterns[level] for n in names[p]]


def _total(cost: dict[str, int]) -> int:
    return cost["attribution"] + cost["baseline_runs"] + cost["patched_sites"]


def _threshold(tau: float, listed: list[_Unit], k: int | None) -> float:
    """``tau``, raised with ``k`` to the ``k``-th largest exact effect among the level's sites once there is one."""
    if k is None:
        return tau
    exact = sorted((abs(u.value) for u in listed if u.value is not None), reverse=True)
    return max(tau, exact[k - 1]) if len(exact) >= k else tau


def _errors(units: Any, tau: float) -> list[float]:
    """The estimator's relative errors ``|exact - estimate| / |estimate|`` on the verified sites with
    ``|estimate| >= tau`` (and non-zero)."""
    return [abs(u.value - u.estimate) / abs(u.estimate) for u in units
            if u.value is not None and u.estimate != 0 and abs(u.estimate) >= tau]


def _rho(family: list[_Unit], listed: list[_Unit], every: Any, tau: float) -> float:
    """The :data:`ERROR_QUANTILE` quantile of the estimator's relative errors on one family's sites of a level
    once it has :data:`_OWN_ERRORS` of them; before, on the level's, and before that on every level's (0 with
    none)."""
    pools = [_errors(family, tau), _errors(listed, tau), _errors(every, tau)]
    pool = next((p for p in pools if len(p) >= _OWN_ERRORS), pools[-1])
    return float(np.quantile(pool, ERROR_QUANTILE)) if pool else 0.0


def _unexplained(listed: list[_Unit], units: dict[str, _Unit], groups: dict[str, list[_Group]]
                 ) -> dict[str, tuple[float, list[_Unit], bool, int]]:
    """Per verified parent with unverified children among ``listed``: the part of its exact effect those
    children do not account for, ``|exact - sum of children|`` (a child counted by its exact effect when
    verified, its estimate otherwise), the children, whether a rest test stands for the parent, and how many of
    the parent's children were patched. Once a rest test holds every unverified child, the smallest such test
    stands for the parent: its exact effect against the sum of its members, where that is below the parent's
    own (:data:`REST_MIN_D`)."""
    children: dict[str, list[_Unit]] = {}
    for u in listed:
        for q in u.parents:
            children.setdefault(q, []).append(u)
    out = {}
    for q, kids in children.items():
        open_ = {u.site for u in kids if u.value is None}
        if units[q].value is None or not open_:
            continue
        value, members, rest = units[q].value, kids, False
        for g in groups.get(q, []):
            if open_ <= g.members and len(g.members) < len(members):
                value, members, rest = g.value, [u for u in kids if u.site in g.members], True
        d = abs(value - sum(u.best for u in members))
        if rest and REST_MIN_D:
            d = min(d, abs(units[q].value - sum(u.best for u in kids)))
        out[q] = (d, members, rest, sum(_ran(u) for u in kids))
    return out


def _pick(listed: list[_Unit], families: list[str], bounds: dict[str, float], threshold: float, k: int | None,
          unexplained: dict, finest: bool = False) -> tuple[list[_Unit], list[tuple[str, _Group]]]:
    """The sites a round verifies (see the module docstring): while the level has fewer than ``k`` exact
    effects, or a family fewer than :data:`_OWN_ERRORS`, the largest bounds that make them up; then every
    site whose bound reaches the threshold and more children of every parent left unexplained."""
    candidates = sorted((u for u in listed if u.value is None and bounds[u.site] >= threshold),
                        key=lambda u: -bounds[u.site])
    first: dict[str, _Unit] = {}
    if k is not None:
        first.update((u.site, u) for u in candidates[: max(0, k - sum(_ran(u) for u in listed))])
    for f in families:
        need = _OWN_ERRORS - sum(_ran(u) for u in listed if u.family == f)
        fresh = [u for u in candidates if u.family == f and u.site not in first]
        first.update((u.site, u) for u in fresh[: max(0, need)])
    if first:
        return list(first.values()), []
    if RISING and k is not None:
        # the threshold the level is heading for if the unverified sites are what AtP says: what can only reach
        # the current threshold is verified later, once this round's exact values have (or have not) raised it
        ahead = max(threshold, _expected_threshold(listed, k))
        soon = [u for u in candidates if bounds[u.site] >= ahead]
        kids, tests = _more_children(unexplained, ahead, bounds, soon, finest)
        if soon or kids or tests:
            return soon + kids, tests
    kids, tests = _more_children(unexplained, threshold, bounds, candidates, finest)
    return candidates + kids, tests


def _expected_threshold(listed: list[_Unit], k: int) -> float:
    """The ``k``-th largest ``|effect|`` among the level's sites, exact where verified, estimated elsewhere."""
    best = sorted((abs(u.best) for u in listed), reverse=True)
    return best[k - 1] if len(best) >= k else 0.0


def _more_children(unexplained: dict, threshold: float, bounds: dict[str, float], todo: list[_Unit],
                   finest: bool = False) -> tuple[list[_Unit], list[tuple[str, _Group]]]:
    """Of each parent whose unexplained part could lift its likeliest unverified child to ``threshold`` (``D``
    plus that child's bound reaches it): a rest test of its unverified children (at least :data:`REST_MIN`),
    once some of its children are patched or taken this round and while it has none; else as many unverified
    children (largest bound first) as it has patched ones, at least one, so they double each round. At the ``finest``
    level (and, with :data:`REST_ALLOWANCE`, where a rest test stands for the parent) ``D`` is first reduced by the
    error allowances (bound minus ``|estimate|``) of the child's unverified siblings: the part of ``D`` they can
    account for within their own bounds is no sign of that child."""
    more: list[_Unit] = []
    tests: list[tuple[str, _Group]] = []
    for parent, (d, kids, rest, verified) in unexplained.items():
        taken = {u.site for u in todo + more}
        open_ = sorted((u for u in kids if u.value is None and u.site not in taken), key=lambda u: -bounds[u.site])
        if not open_:
            continue
        if finest or (rest and REST_ALLOWANCE):
            siblings = (u for u in kids if u.value is None and u is not open_[0])
            d = max(0.0, d - sum(bounds[u.site] - abs(u.estimate) for u in siblings))
        if d + bounds[open_[0].site] < threshold:
            continue
        step = max(1, verified)
        # one rest test a parent, of fewer children than it has changed ones (else it is the parent again)
        fresh = REST_TESTS and not rest and REST_MIN <= len(open_) < sum(not u.skipped for u in kids)
        site = _group_site(open_) if fresh else None
        if site is not None:
            tests.append((parent, _Group(site, frozenset(u.site for u in open_))))
        else:
            more += open_[:step]
    return more, tests


def _level_k(k: int | None, listed: list[_Unit], finest: list[_Unit], units: dict[str, _Unit]) -> int | None:
    """How many sites a coarser level ranks exactly with ``k`` (``k_l``): as many of its sites as are among the
    finest level's ``k`` largest estimates or their ancestors, at least one. A coarse level then ranks about as
    many sites as the likely finest top ``k`` have parents there, instead of ``k`` of its own (which made the
    coarse levels cost more than the finest one at ``k = 20``)."""
    if k is None:
        return None
    here = {u.site for u in listed}
    held: set[str] = set()
    for unit in sorted(finest, key=lambda u: -abs(u.estimate))[:k]:
        todo = [unit.site]
        while todo:
            site = todo.pop()
            if site not in held:
                held.add(site)
                todo += units[site].parents
    return max(1, len(held & here))


def _ran(u: _Unit) -> bool:
    """Whether ``u`` was verified by patching it (not known unchanged)."""
    return u.value is not None and not u.skipped


def _unit_lists(sites: list[_Unit]) -> dict[str, list]:
    return {
        "verified": [u.value is not None for u in sites],
        "estimate": [u.estimate for u in sites],
        "skipped": [u.skipped for u in sites],
    }
