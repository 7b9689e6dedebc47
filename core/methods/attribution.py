"""Attribution patching (AtP) and AtP*: a first-order estimate of activation patching for every
site of a sweep at once, in two forwards and one backward.

For a site ``n`` with activation ``a_n`` the estimate of patching ``n`` from the *source* run into
the *base* run is ``(a_n(source) - a_n(base)) . d metric / d a_n |base``, summed over the elements
the site selects and averaged over prompts. The convention follows :func:`activation_patching`:

* ``direction="denoising"`` (default): base = corrupt, source = clean, so the value estimates
  ``metric(corrupt with n := clean) - metric(corrupt)`` (the gradient is taken on the corrupt run);
* ``direction="noising"``: base = clean, source = corrupt: ``(a_corrupt - a_clean) . grad|clean``,
  the form of Kramár et al. 2024, estimating ``metric(clean with n := corrupt) - metric(clean)``.

Either way the Result has the dims and coords :func:`activation_patching` gives for the same
pattern, so :func:`compare` can rank one against the other.

Cost: one forward of the base inputs with ``grad=True`` in which every needed site key gets a "tap"
(the site's value as its own node in the graph, a leaf copy only where nothing upstream needs
gradients: values unchanged, frozen parameters do not matter), one capture forward of the source
inputs (inference mode; in a causal model only from the first position where the two inputs differ,
the earlier positions being the base run's: :mod:`.shared_prefix`, ``metadata["shared_positions"]``),
and a single ``torch.autograd.grad`` of the summed metric with respect to all taps. A family that is a linear map
of another (:class:`~crosspatch.catalog.LinearFrom`: ``head_out`` of ``head_z``) is tapped at its
source, which gives the same products summed over the mixed axis without building any per-head
write; a site that selects along that axis taps the family itself. When the metric reads one output
position (:attr:`Metric.position`) both forwards compute the model's output head there only.

AtP* (Kramár et al. 2024), what is implemented here:

* **GradDrop** (``grad_drop=True``): for every layer ``l`` the gradient is recomputed with the
  backward pass through layer ``l``'s writes into the residual (``attn_out.l`` and ``mlp_out.l``
  by default, or ``grad_drop_groups``) stopped, forward values unchanged. All ``L`` variants run
  as extra row blocks of the *same* gradient forward (batch ``(L + 1) * n``) and the same single
  backward. Dropping a node's own layer zeroes the node's estimate (the stop is applied after the
  node's tap, on the layer's output), which is why the paper divides by ``L - 1``: the score is
  ``sign(AtP(n)) * sum_l |AtP_l(n)| / (L - 1)`` (``/ 1`` when ``L == 1``), with ``AtP_l`` the
  per-prompt-averaged estimate under drop ``l``. For a write of the last layer (``head_out``,
  ``attn_out``, ``mlp_out``) it equals ``AtP(n)``.
  Taking the sign of plain AtP (the paper ranks by magnitude only) keeps the Result comparable
  with patching; plain AtP is kept in ``metadata["atp"]``.
* **Attention softmax**: for ``attn_pattern`` sites the difference used is between the exact
  softmax patterns of the two runs (captured after the softmax), so the estimate linearises the
  metric in the pattern only, never through the scores. For ``head_out`` sites the softmax is
  upstream of the site, so nothing inside the head is linearised.
* **Query/key fix** (``qk_fix=True``, :mod:`.qk_fix`): for ``head_in`` query and key sites (a head's
  query or key input) the estimate is ``sum dmetric/dA * (A' - A)`` with ``A'`` the head's exact
  pattern when that input comes from the source run, computed for every head and layer at once by one
  extra forward of ``2 * n`` rows. Value sites keep plain AtP. Not implemented: the paper's correction
  of an *upstream* node's effect through later heads' queries and keys (a forward-mode product per node).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

import numpy as np
import torch
from torch import nn

from ..engine.adapter import repeat_rows
from ..engine.cache import Cache
from ..engine.forward import Bound, Run, execute
from ..engine.interventions import Intervention
from ..results.metrics import Metric, MetricContext
from ..engine.model import WrappedModel
from ..results.result import Result, collect_versions
from ..sites.selection import axis_index
from ..sites.site import Site, split_tower
from .pairs import check_gap, label_positions, prepare_pair, same_masks
from .qk_fix import corrected_products, exact_patterns, qk_layers
from .shared_prefix import capture_sharing_prefix, may_share

__all__ = ["attribution_patching", "compare", "BaseAndSource"]


@dataclass
class BaseAndSource:
    """The base and source runs an attribution call made, for a caller that patches into the same runs
    (:class:`~crosspatch.methods.localize_verify.Verifier`): ``base`` is the gradient forward's first row block,
    detached, with its output at the metric's positions and its kept prefix; ``source`` the source run's captures
    (before the first position where the inputs differ, the base run's values) and output (at the metric's
    positions where the masks agree). Both caches hold the tapped keys."""

    base: Run
    source: Cache
    source_output: torch.Tensor


class _Tap(Intervention):
    """The site's value unchanged, kept as ``delta``: the gradient handle of the site (``d metric / d delta``
    is the total derivative with respect to the site's value, every path through it counted once)."""

    kind = "_tap"

    def __init__(self):
        self.delta: torch.Tensor | None = None

    def apply(self, x, ctx):
        # The engine hands a whole-site tap a view of the activation (its own node in the graph) and any other
        # selection as a copy; either is the handle. Only a view of a value outside the graph is copied, to
        # become a leaf: the site is upstream of everything that needs gradients.
        if not x.requires_grad:
            x = x.clone() if x._is_view() else x
            x.requires_grad_()
        self.delta = x
        return x


class _StopGrad(Intervention):
    """Same value, no gradient through it (GradDrop)."""

    kind = "_stop_grad"

    def apply(self, x, ctx):
        return x.detach()


def _default_groups(catalog, sites: Sequence[Site]) -> list[list[str]]:
    """Per layer, its residual writes (``attn_out.l``, ``mlp_out.l``); with tower prefixes (``vision.``),
    the layers of every tower the sites are in, tower by tower."""
    groups = []
    for t in sorted({split_tower(site.family)[0] for site in sites}):
        fams = [t + f for f in ("attn_out", "mlp_out") if t + f in catalog]
        if fams:
            groups += [[f"{f}.{layer}" for f in fams] for layer in range(catalog.family(fams[0]).layers or 1)]
    if not groups:
        raise ValueError(
            "grad_drop needs the layers' residual writes; this catalog has no attn_out / mlp_out, so pass "
            "grad_drop_groups=[[site_key, ...] per layer]"
        )
    return groups


def attribution_patching(
    model: "WrappedModel | nn.Module",
    clean: Any,
    corrupt: Any,
    sites: "str | Site | Sequence[str | Site]",
    metric: "Metric | Callable",
    *,
    direction: Literal["denoising", "noising"] = "denoising",
    grad_drop: bool = False,
    grad_drop_groups: Sequence[Sequence[str]] | None = None,
    normalize: bool = False,
    qk_fix: bool = False,
    keep_runs: "list[BaseAndSource] | None" = None,
) -> Result:
    """AtP for every site of ``sites`` at once; AtP* is ``grad_drop=True, qk_fix=True``.

    ``grad_drop``: AtP*'s GradDrop (no extra forward). ``qk_fix``: AtP*'s exact attention softmax for
    ``head_in`` query and key sites (one extra forward of ``2 * n`` rows; :mod:`.qk_fix`). They are
    separate switches because they fix separate failures and cost differently; either composes with the other.

    Returns a Result with the dims and coords of ``activation_patching`` for the same pattern.
    See the module docstring for the formula, the conventions and the cost.
    ``keep_runs``: a list to which the base and source runs are appended (:class:`BaseAndSource`) when the
    base run kept a prefix (a causal model whose inputs share their first position), so that exact patching
    into the same pair needs no runs of its own.
    """
    pair = prepare_pair(model, clean, corrupt, metric, direction)
    m, metric, n, base_in, source_in = pair.model, pair.metric, pair.n, pair.base, pair.source
    sweep = pair.expand(sites)
    by_key: dict[str, list[int]] = {}
    for i, site in enumerate(sweep.sites):
        by_key.setdefault(site.key, []).append(i)
    keys = list(by_key)
    reads = {key: _read_key(m.catalog, key, [sweep.sites[i] for i in by_key[key]]) for key in keys}  # what is tapped
    tapped = list(dict.fromkeys(reads.values()))
    qk = qk_layers(sweep.sites, m.catalog) if qk_fix else []
    patterns = [layer.pattern for layer in qk]

    groups: list[list[str]] = []
    if grad_drop:
        raw = grad_drop_groups if grad_drop_groups is not None else _default_groups(m.catalog, sweep.sites)
        groups = [[m.catalog.resolve(k).key for k in g] for g in raw]
    blocks = 1 + len(groups)
    inputs = repeat_rows(base_in, blocks)
    taps = {key: _Tap() for key in tapped + patterns}
    bounds: list[Bound] = [Bound(Site.parse(key), tap) for key, tap in taps.items()]
    for b, group in enumerate(groups, start=1):  # after the taps: dropping a node's own layer zeroes it
        bounds += [Bound(Site.parse(k), _StopGrad(), slice(b * n, (b + 1) * n)) for k in group]

    # Forward 1, with grad, keeping what a run of inputs sharing its first positions can start from.
    ctx = MetricContext(torch.arange(n).repeat(blocks), None, inputs.get("attention_mask"))
    run = execute(m.module, m.adapter, m.catalog, inputs, bounds, capture=tapped + patterns, grad=True,
                  output_at=metric.positions(ctx, pair.sizes), keep_prefix=may_share(m, base_in, source_in))
    base_out = run.output[:n].detach()

    # Forward 2: the source activations, under inference mode, from the first position where the inputs
    # differ in a causal model. The output is needed only where the metric reads it; the base run's mask
    # decides where it reads the clean output, so only equal masks restrict.
    src_ctx = MetricContext(torch.arange(n), None, source_in.get("attention_mask"))
    first = None if run.prefix is None else (inputs, run.prefix, {k: run.cache[k] for k in tapped})
    kept, run.prefix = (run.prefix if keep_runs is not None else None), None
    src_out, src_values, shared = capture_sharing_prefix(
        m, source_in, tapped, metric.positions(src_ctx, pair.sizes) if same_masks(source_in, base_in) else None, first
    )
    del first
    if kept is not None and shared > 0:
        keep_runs.append(_base_and_source(run, base_in, source_in, tapped, src_values, src_out, n, kept))  # type: ignore[union-attr]
    del kept

    # The one backward.
    ctx.example, ctx.clean = ctx.example.to(base_out.device), src_out if direction == "denoising" else base_out
    values = metric(run.output, ctx)
    grads = torch.autograd.grad(values.sum(), [taps[k].delta for k in tapped + patterns], allow_unused=True)
    grads, pattern_grads = dict(zip(tapped, grads[: len(tapped)])), dict(zip(patterns, grads[len(tapped) :]))

    exact = {}
    if qk:  # Forward 3: every needed head's pattern with its query / key input from the source run
        base_cache = {lay.head_in: run.cache[lay.head_in].detach()[:n] for lay in qk}
        exact = exact_patterns(m, base_in, base_cache, {lay.head_in: src_values[lay.head_in] for lay in qk}, qk)
    qk_of = {lay.head_in: lay.pattern for lay in qk}

    with torch.no_grad():
        base_metric = values[:n].detach()
        src_ctx.example, src_ctx.clean = src_ctx.example.to(base_out.device), ctx.clean
        source_metric = metric(src_out, src_ctx)
        per_block = np.zeros((blocks, len(sweep)))
        plain = np.zeros(len(sweep))
        for key in keys:
            fam, read = m.catalog.family(Site.parse(key).family), reads[key]
            a_base = run.cache[read].detach()[:n]
            diff = src_values[read].to(a_base.dtype) - a_base
            grad = grads[read]
            grad = torch.zeros((blocks * n, *diff.shape[1:]), dtype=diff.dtype, device=diff.device) if grad is None else grad
            mine = by_key[key]
            for b in range(blocks):
                prod = (diff * grad[b * n : (b + 1) * n]).double()
                if read != key:
                    prod = _in_layout(prod, m.catalog.family(Site.parse(read).family), fam)
                per_block[b, mine] = _site_sums(prod, [sweep.sites[i] for i in mine], fam)
                if b == 0:
                    plain[mine] = per_block[b, mine]
                if key in qk_of:
                    pattern, g_pattern = run.cache[qk_of[key]].detach()[:n], pattern_grads[qk_of[key]]
                    g_pattern = torch.zeros_like(pattern) if g_pattern is None else g_pattern[b * n : (b + 1) * n]
                    fixed = corrected_products(prod, g_pattern.double(), pattern, exact[key])
                    per_block[b, mine] = _site_sums(fixed, [sweep.sites[i] for i in mine], fam)
    atp = per_block[0]
    if grad_drop:
        mags = np.abs(per_block[1:]).sum(axis=0) / max(len(groups) - 1, 1)
        scores = np.sign(atp) * mags
    else:
        scores = atp
    clean_metric, corrupt_metric = (source_metric, base_metric) if direction == "denoising" else (base_metric, source_metric)
    gap = float((clean_metric - corrupt_metric).double().mean())
    if normalize:
        check_gap(float(clean_metric.double().mean()), float(corrupt_metric.double().mean()), metric.name)
        scores = scores / gap
        atp = atp / gap
        plain = plain / gap

    metadata = {
        "method": "attribution_patching",
        "variant": _variant(grad_drop, qk_fix),
        "metric": metric.name,
        "sites": str(sites) if isinstance(sites, (str, Site)) else [str(s) for s in sites],
        "direction": direction,
        "normalize": normalize,
        "n_prompts": n,
        "seed": None,
        "shared_positions": shared,
        "grad_drop_groups": groups,
        "atp": plain.tolist(),
        "baseline": {"clean": float(clean_metric.double().mean()), "corrupt": float(corrupt_metric.double().mean())},
        "model": m.describe(),
        "adapter": m.adapter.name,
        "versions": collect_versions(),
    }
    coords = label_positions(dict(sweep.coords), m.position_labels(pair.clean))
    return Result(scores.reshape(sweep.shape), sweep.dims, coords, metadata)


def _base_and_source(run: Run, base_in, source_in, tapped: list[str], src_values: dict, src_out: torch.Tensor, n: int,
                     prefix) -> BaseAndSource:
    """The gradient forward's first row block (detached) with its kept prefix, and the source run's captures."""
    axes = {k: run.cache.axes[k] for k in tapped}
    base = Run(run.output[:n].detach(), Cache({k: run.cache[k].detach()[:n] for k in tapped}, axes,
                                              base_in.get("attention_mask")), prefix=prefix.first_rows(n))
    return BaseAndSource(base, Cache({k: src_values[k].detach() for k in tapped}, axes, source_in.get("attention_mask")),
                         src_out.detach())


def _read_key(catalog, key: str, sites: Sequence[Site]) -> str:
    """The site key to tap for ``key`` (``sites`` are its sites): the family's linear source when every
    site can be read there (:meth:`Catalog.through_source`: ``head_out`` as ``head_z``), else ``key``."""
    through = {catalog.through_source(s).key for s in sites}
    return through.pop() if len(through) == 1 else key


def _in_layout(prod: torch.Tensor, source, family) -> torch.Tensor:
    """Products ``[n, *source axes]`` summed over the axes ``family.linear_from`` mixes, laid out on
    ``family``'s axes (size 1 on the axes it does not share with the source)."""
    shared = [a for a in source.axis_names if a in family.linear_from.shared]
    mixed = [i + 1 for i, a in enumerate(source.axis_names) if a not in shared]
    prod = prod.sum(dim=mixed) if mixed else prod
    prod = prod.permute(0, *[shared.index(a) + 1 for a in family.axis_names if a in shared])
    for i, a in enumerate(family.axis_names):
        if a not in shared:
            prod = prod.unsqueeze(i + 1)
    return prod


def _site_sums(prod: torch.Tensor, sites: Sequence[Site], family) -> np.ndarray:
    """Per site, the prompt-mean of the products summed over the site's selection: one transfer of the
    prompt-mean, then indexing on the host (one gather when every site picks one index on the same axes,
    as a ``*`` sweep does)."""
    mean = prod.mean(dim=0).cpu().numpy()
    names = family.axis_names
    picked = [a for a, _ in sites[0].sel]
    if all([a for a, _ in s.sel] == picked and all(type(v) is int for _, v in s.sel) for s in sites):
        axes = sorted(names.index(a) for a in picked)
        summed = mean.sum(axis=tuple(i for i in range(len(names)) if i not in axes))  # the picked axes, in order
        index = tuple(np.array([s.selection[names[i]] for s in sites]) % mean.shape[i] for i in axes)
        return np.asarray(summed[index] if axes else np.full(len(sites), summed), dtype=float)
    out = np.empty(len(sites))
    for i, site in enumerate(sites):
        index = axis_index(site, family, mean.shape, torch.device("cpu"))
        out[i] = mean[tuple(p.numpy() if isinstance(p, torch.Tensor) else p for p in index)].sum()
    return out


def _variant(grad_drop: bool, qk_fix: bool) -> str:
    if grad_drop and qk_fix:
        return "atp*"
    return "atp*_graddrop" if grad_drop else "atp*_qk" if qk_fix else "atp"


def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share the mean of their ranks), as Spearman's rho needs."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x), dtype=float)
    _, inverse = np.unique(x, return_inverse=True)
    return (np.bincount(inverse, ranks) / np.bincount(inverse))[inverse]


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    denom = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / denom) if denom > 0 else float("nan")


def compare(attribution: Result, patching: Result, k: int = 5) -> dict:
    """How well an attribution estimate ranks sites like exact patching.

    Returns ``spearman`` and ``pearson`` on the signed values, ``spearman_abs`` on magnitudes,
    ``top{k}_overlap`` (shared share of the ``k`` sites with the largest ``|value|``), ``top1_agree``
    and ``sign_agreement``. Both results must have the same dims and coords.
    """
    if attribution.dims != patching.dims or attribution.coords != patching.coords:
        raise ValueError(
            f"the results cover different sites: dims {attribution.dims} vs {patching.dims}; compare the "
            f"same sweep pattern"
        )
    a, p = attribution.values.reshape(-1), patching.values.reshape(-1)
    k = max(1, min(k, a.size))
    top_a = set(np.argsort(-np.abs(a), kind="mergesort")[:k].tolist())
    top_p = set(np.argsort(-np.abs(p), kind="mergesort")[:k].tolist())
    return {
        "n_sites": int(a.size),
        "spearman": _corr(_ranks(a), _ranks(p)),
        "spearman_abs": _corr(_ranks(np.abs(a)), _ranks(np.abs(p))),
        "pearson": _corr(a, p),
        f"top{k}_overlap": len(top_a & top_p) / k,
        "top1_agree": bool(np.argmax(np.abs(a)) == np.argmax(np.abs(p))),
        "sign_agreement": float(np.mean(np.sign(a) == np.sign(p))),
    }
