"""CD-T: contextual decomposition for transformers (Hsu et al., ICLR 2025, arXiv 2407.00886).

Every activation is carried as two parts, ``rel + irrel``: what a chosen set of *source* nodes
contributes and everything else. At a source node the part of the activation that differs from a
baseline becomes relevant (``rel = a - base``, ``irrel = base``; the baseline is zero or the node's mean
over a reference set); from there each operation of the model maps the two parts to the next node's
two parts by a propagation rule (:mod:`.cdt_rules`), and the relevance is read at a *target*: the logits
(scored with a metric) or any later node.

The rules need the model's forward written over pairs, node by node, which only an adapter can write
(its norms, attention, MLP). The seam is :class:`DecomposedForward`: an adapter offers one with
:meth:`~crosspatch.engine.adapter.Adapter.decomposed_forward` (the transformers adapter:
``crosspatch.adapters.transformers.cdt_blocks``, for GPT-2, the Llama family and BERT / RoBERTa); this
module sets the sources and reads the targets through the ``visit`` callback the forward calls at every
node, and never imports an architecture.

``rel + irrel`` equals the model's own activation at every node up to float rounding (the tests hold it
to 1e-5 in float32 and 1e-10 in float64 at every node, with padding); sources at every position of the
embedding make ``rel`` the whole output; no source leaves ``rel`` exactly zero everywhere but in the
relevant attention pattern. ``docs/cdt.md`` has the rules, the conventions and what the method can miss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal, Protocol, Sequence, runtime_checkable

import torch
from torch import nn

from ..engine.adapter import Inputs, batch_size
from ..engine.forward import execute
from ..engine.model import WrappedModel, wrap
from ..progress import progress_bar
from ..results.metrics import Metric, MetricContext
from ..results.result import Result, collect_versions
from ..sites.selection import check_padding, index_for
from ..sites.site import ANY, LAST, Site, SiteError, split_tower
from .activation_patching import label_positions
from .cdt_rules import Pair
from .pairs import model_metric, rows_per_forward

__all__ = ["NodeFamily", "DecomposedForward", "Visit", "Decomposition", "decompose", "cdt"]


@dataclass(frozen=True)
class NodeFamily:
    """A kind of node the decomposed forward visits: its axes after the rows axis, its layers (None: one node,
    ``embed`` or ``logits``) and whether it may hold a source (else it is read as a target only)."""

    name: str
    axes: tuple[str, ...]
    layers: int | None = None
    source: bool = True


Visit = Callable[[str, Pair], Pair]


@runtime_checkable
class DecomposedForward(Protocol):
    """What CD-T needs of an architecture: the model's forward over ``(rel, irrel)`` pairs, node by node.

    ``families`` lists every node family :meth:`run` visits: ``embed`` first, then one block's nodes in
    forward order, the output ``logits`` last (when the model has a head the rules cover). Families that the
    catalog also has carry its axes, so a node's parts are laid out like the catalog's activation.
    """

    families: Sequence[NodeFamily]

    def prepare(self, inputs: Inputs) -> Any:
        """What :meth:`run` needs of prepared ``inputs`` besides the weights (e.g. one forward of the model
        recording each block's input, attention mask and position embeddings)."""
        ...

    def run(self, prepared: Any, visit: Visit, *, repeat: int = 1, start: int = 0) -> None:
        """The forward over pairs on the prepared inputs' rows repeated ``repeat`` times (block order: all rows,
        then again). It starts at block ``start`` with ``rel = 0`` and ``irrel`` the model's residual entering it
        (at ``embed`` when ``start == 0``) and calls ``visit(key, (rel, irrel))`` at every node (``key`` as a site
        key: ``"embed"``, ``"head_z.3"``, ``"logits"``; parts ``[rows, *axes]``), going on with the pair it
        returns (a target-only node's return is ignored). Exceptions from ``visit`` propagate: that is how a
        run ends once its targets are read."""
        ...


@dataclass
class Decomposition:
    """Per source set and target, the relevant and irrelevant parts, ``[sets, prompts, *selected axes]``.

    ``sets`` are the source sets in the order of ``dims`` / ``coords`` (the sweep's layout); ``rel`` and
    ``irrel`` are keyed by the target as written (``str(site)``; every node key for ``targets="all"``).
    """

    sets: list[tuple[Site, ...]]
    dims: tuple[str, ...]
    coords: dict[str, list]
    rel: dict[str, torch.Tensor]
    irrel: dict[str, torch.Tensor]

    def total(self, key: str) -> torch.Tensor:
        """``rel + irrel`` at ``key``: the model's own activation, once per source set."""
        return self.rel[key] + self.irrel[key]


#: Families whose nodes write the residual as a component of the edge graph (cut under ``direct``).
_WRITERS = ("head_z", "head_out", "mlp_out")


class _Done(Exception):
    """Every target of a run has been read: the rest of the forward is not needed."""


def decomposed_forward(m: WrappedModel) -> DecomposedForward:
    """The model's forward over pairs, from its adapter; a clear error when the adapter has none."""
    forward = m.adapter.decomposed_forward(m.module)
    if forward is None:
        raise NotImplementedError(
            f"CD-T needs the model's forward over (rel, irrel) pairs, and the {m.adapter.name!r} adapter has none for "
            f"{type(m.module).__name__} (the transformers adapter has it for GPT-2, Llama, Mistral, Qwen2, BERT and "
            f"RoBERTa). An adapter offers it with Adapter.decomposed_forward (crosspatch.methods.cdt.DecomposedForward)"
        )
    return forward


def decompose(
    model: "WrappedModel | nn.Module",
    inputs: Any,
    sources: Any,
    targets: "str | Site | Sequence[str | Site]" = "logits",
    *,
    irrel: Literal["zero", "mean"] = "zero",
    reference: Any = None,
    over: Sequence[str] = ("batch",),
    batch_size: int | None = None,
    progress: bool | None = None,
    direct: bool = False,
) -> Decomposition:
    """The ``(rel, irrel)`` decomposition at ``targets`` for every source set of ``sources``.

    ``sources``: a site pattern (or a list of them), each concrete site of its sweep one source set
    (``"head_z.*[pos=*,head=*]"``: every head at every position, one at a time), or a list whose items are
    lists of sites, each list one source set (``[["head_z.0[head=1]", "mlp_out.0[pos=3]"], []]``; an empty
    one is the set of no sources). Sources sit at ``embed``, ``resid_pre`` / ``resid_mid`` / ``resid_post``,
    ``head_z`` (a head, ``head_out`` is read as its ``head_z``), ``attn_out``, ``mlp_act`` and ``mlp_out``,
    at any selection of their axes. ``irrel``: the baseline a source keeps as irrelevant, ``"zero"`` or
    ``"mean"`` (the node's mean over the ``reference`` inputs, over ``over``: ``("batch",)`` per position, as
    the paper, or ``("batch", "pos")``; padding is left out of the mean).

    ``targets``: concrete sites of the decomposed forward's nodes (``"logits"``, ``"head_in.1[head=2]"``,
    ``"head_q.1[head=0]"``, ``"resid_post.0[pos=4]"`` ...), or ``"all"`` for every node whole (the exactness
    checks). Source sets are batched ``batch_size`` rows (sets x prompts) a forward (None: as
    :func:`~crosspatch.methods.pairs.rows_per_forward`), each forward starting at the first block any of its
    sets or targets is in, from the model's own residual there.

    ``direct``: relevance travels along the residual stream only: at every node that writes the residual as a
    component of the edge graph (a head's ``head_z`` / ``head_out``, ``mlp_out``) the relevant part is handed to the
    irrelevant one before the sources are set, so a target sees the sources' own writes and nothing a later head or
    MLP computed from them (the edge ``source -> target`` rather than every path). The sum is unchanged.
    """
    m = wrap(model)
    forward = decomposed_forward(m)
    prepared_in = m.prepare(inputs)
    n, sizes = _rows(prepared_in), m.adapter.sizes(prepared_in)
    mask = prepared_in.get("attention_mask")
    families = {f.name: f for f in forward.families}
    sets, dims, coords = _source_sets(m, families, sources, sizes, mask)
    reads = None if isinstance(targets, str) and targets == "all" else _targets(m, families, targets, sizes, mask)
    if irrel not in ("zero", "mean"):
        raise ValueError(f"irrel must be 'zero' or 'mean', got {irrel!r}")
    means: dict[str, torch.Tensor] = {}
    if irrel == "mean":
        if reference is None:
            raise ValueError("irrel='mean' sets each source's irrelevant part to its mean over a reference set: pass reference=")
        means = _means(m, families, sets, reference, tuple(over), sizes)

    layers = max((f.layers or 0) for f in forward.families)
    limit = 0 if reads is None else min((_block(site) for site in reads), default=layers)
    starts = [min(limit, min((_block(site) for site in group), default=layers)) for group in sets]
    order = sorted(range(len(sets)), key=lambda j: starts[j])
    per_forward = max(1, rows_per_forward(batch_size, m, n) // n)
    prepared = forward.prepare(prepared_in)

    rel: dict[str, list] = {}
    irr: dict[str, list] = {}
    bar = progress_bar(range(len(sets)), progress, desc=f"CD-T for {len(sets)} source sets", unit="set")
    try:
        with torch.inference_mode():
            for first in range(0, len(order), per_forward):
                members = order[first : first + per_forward]
                visitor = _Visitor([sets[j] for j in members], n, families, means, reads, direct)
                try:
                    forward.run(prepared, visitor, repeat=len(members), start=starts[members[0]])
                except _Done:
                    pass
                missing = visitor.missing()
                if missing:
                    raise SiteError(f"the decomposed forward of {type(m.module).__name__} never reached {missing}")
                for key, (r, i) in visitor.got.items():
                    rel.setdefault(key, [None] * len(sets))
                    irr.setdefault(key, [None] * len(sets))
                    for slot, j in enumerate(members):
                        rel[key][j], irr[key][j] = r[slot * n : (slot + 1) * n], i[slot * n : (slot + 1) * n]
                if hasattr(bar, "update"):
                    bar.update(len(members))
    finally:
        if hasattr(bar, "close"):
            bar.close()
    return Decomposition(
        sets, dims, coords, {k: torch.stack(v) for k, v in rel.items()}, {k: torch.stack(v) for k, v in irr.items()}
    )


def cdt(
    model: "WrappedModel | nn.Module",
    inputs: Any,
    sources: Any,
    metric: "Metric | Callable | None" = None,
    *,
    target: "str | Site" = "logits",
    irrel: Literal["zero", "mean"] = "zero",
    reference: Any = None,
    over: Sequence[str] = ("batch",),
    batch_size: int | None = None,
    progress: bool | None = None,
) -> Result:
    """CD-T relevance of every source set of ``sources`` (as :func:`decompose`) at ``target``, as a Result.

    With a ``metric`` (target ``logits``): the metric of the relevant logits, averaged over prompts. A metric
    linear in the logits (``logit_diff``) makes this the sources' share of the model's metric: the shares of
    the relevant and irrelevant parts add up to it (``metadata["full"]``). Without one: the relevant part's
    norm over the target's selection divided by the total's, averaged over prompts.

    The Result has the sweep's dims and coords (``layer``, ``pos``, ``head`` ... for a pattern; ``site`` for a
    list of patterns; ``source`` for a list of source sets), like :func:`activation_patching` on the same pattern.
    """
    m = wrap(model)
    prepared = m.prepare(inputs)
    n = _rows(prepared)
    dec = decompose(m, prepared, sources, [target], irrel=irrel, reference=reference, over=over,
                    batch_size=batch_size, progress=progress)
    key = next(iter(dec.rel))
    rel, irr = dec.rel[key], dec.irrel[key]
    sets = rel.shape[0]
    extra: dict[str, Any] = {}
    if metric is not None:
        site = Site.parse(target)
        if site.family != "logits" or site.sel:
            raise ValueError(f"a metric reads the whole logits; target is {target!r}: leave target='logits', or drop the metric")
        metric = model_metric(m, metric)
        full = rel[0] + irr[0]
        mask = prepared.get("attention_mask")
        ctx = MetricContext(torch.arange(n, device=rel.device).repeat(sets), full,
                            None if mask is None else mask.repeat(sets, 1))
        with torch.inference_mode():
            values = metric(rel.flatten(0, 1), ctx).view(sets, n).double()
            full_metric = metric(full, MetricContext(torch.arange(n, device=rel.device), full, mask)).double()
        per_set = values.mean(dim=1)
        extra = {"metric": metric.name, "full": float(full_metric.mean())}
    else:
        total = rel + irr
        dims = tuple(range(2, rel.ndim))
        top = rel.double().pow(2).sum(dim=dims).sqrt()
        bottom = total.double().pow(2).sum(dim=dims).sqrt()
        per_set = (top / torch.where(bottom > 0, bottom, torch.ones_like(bottom))).mean(dim=1)
        extra = {"metric": None, "score": "norm(rel) / norm(rel + irrel) at the target"}
    shape = tuple(len(dec.coords[d]) for d in dec.dims)
    metadata = {
        "method": "cdt",
        **extra,
        "target": str(target),
        "sources": _describe(sources),
        "irrel": irrel,
        "over": list(over) if irrel == "mean" else None,
        "n_prompts": n,
        "seed": None,
        "model": m.describe(),
        "adapter": m.adapter.name,
        "versions": collect_versions(),
    }
    coords = label_positions(dict(dec.coords), m.position_labels(prepared))
    return Result(per_set.reshape(shape).cpu().numpy(), dec.dims, coords, metadata)


# -- sources, targets, baselines ------------------------------------------------------------------------


def _rows(inputs: Inputs) -> int:
    return batch_size(inputs)


def _describe(sources: Any) -> Any:
    if isinstance(sources, (str, Site)):
        return str(sources)
    return [_describe(s) if not isinstance(s, (str, Site)) else str(s) for s in sources]


def _block(site: Site) -> int:
    """The block a node is in (``embed``: 0); ``logits`` is after every block."""
    if site.family == "embed":
        return 0
    return site.layer if isinstance(site.layer, int) else 1 << 30


def _shape(names: Sequence[str], sizes: dict[str, int]) -> list[int]:
    return [sizes.get(a, 0) for a in names]


def _resolve(m: WrappedModel, families: dict[str, NodeFamily], site: "str | Site", sizes: dict[str, int],
             mask: torch.Tensor | None, role: str) -> Site:
    """One concrete node: checked by the catalog where it has the family, else against the forward's families."""
    site = Site.parse(site)
    fam = families.get(site.family)
    if fam is None:
        raise SiteError(
            f"CD-T cannot use {site} as a {role}: the decomposed forward of {type(m.module).__name__} has nodes "
            f"{', '.join(families)}"
        )
    if site.family in m.catalog:
        site = m.catalog.resolve(site, sizes)
    else:
        if (site.layer is None) != (fam.layers is None):
            raise SiteError(f"{role} {site}: family {fam.name!r} " + ("has no layers" if fam.layers is None else
                            f"has layers 0..{fam.layers - 1}; write {fam.name}.<layer>"))
        if isinstance(site.layer, int):
            if not -fam.layers <= site.layer < fam.layers:
                raise SiteError(f"{role} {site}: layer {site.layer} is out of range 0..{fam.layers - 1}")
            site = Site(site.family, site.layer % fam.layers, site.sel)
        unknown = sorted(set(site.selection) - set(fam.axes))
        if unknown:
            raise SiteError(f"{role} {site}: {fam.name!r} has axes ({', '.join(fam.axes)}), not {unknown}")
    if site.is_pattern or any(v == ANY for v in site.selection.values()):
        raise SiteError(f"{role} {site} is a pattern; a {role} is one node (write its layer and indices, no *)")
    if any(v == LAST for v in site.selection.values()):
        raise SiteError(f"{role} {site}: pos=last is not supported by CD-T; write the position")
    check_padding(site, fam.axes, _shape(fam.axes, sizes), mask)
    return site


def _source_sets(m: WrappedModel, families: dict[str, NodeFamily], sources: Any, sizes: dict[str, int],
                 mask: torch.Tensor | None) -> tuple[list[tuple[Site, ...]], tuple[str, ...], dict[str, list]]:
    """Source sets with the dims and coords of the result: a sweep (one site a set) or a list of sets."""
    grouped = not isinstance(sources, (str, Site)) and any(not isinstance(s, (str, Site)) for s in sources)
    if not grouped:
        sweep = m.catalog.expand(sources, sizes)
        raw = [(site,) for site in sweep.sites]
        dims, coords = sweep.dims, dict(sweep.coords)
    else:
        raw, labels = [], []
        for group in sources:
            members = [group] if isinstance(group, (str, Site)) else list(group)
            raw.append(m.catalog.expand(members, sizes).sites if members else ())
            labels.append(" + ".join(str(s) for s in members) or "(none)")
        dims, coords = ("source",), {"source": labels}

    def source(site: Site) -> Site:
        site = m.catalog.through_source(m.catalog.resolve(site, sizes))  # a head's write is set at its head_z
        site = _resolve(m, families, site, sizes, mask, "source")
        if not families[site.family].source:
            names = ", ".join(f.name for f in families.values() if f.source)
            raise SiteError(f"source {site}: {site.family!r} is read as a target only; sources sit at {names}")
        return site

    return [tuple(source(s) for s in group) for group in raw], dims, coords


def _targets(m: WrappedModel, families: dict[str, NodeFamily], targets: Any, sizes: dict[str, int],
             mask: torch.Tensor | None) -> list[Site]:
    items = [targets] if isinstance(targets, (str, Site)) else list(targets)
    if not items:
        raise ValueError("CD-T needs at least one target")
    return [_resolve(m, families, t, sizes, mask, "target") for t in items]


def _means(m: WrappedModel, families: dict[str, NodeFamily], sets: list[tuple[Site, ...]], reference: Any,
           over: tuple[str, ...], sizes: dict[str, int]) -> dict[str, torch.Tensor]:
    """Each source node's mean over the reference inputs, ``[1, *axes]``; padded positions left out."""
    keys = list(dict.fromkeys(site.key for group in sets for site in group))
    if not keys:
        return {}
    ref = m.prepare(reference)
    run = execute(m.module, m.adapter, m.catalog, ref, capture=keys)
    mask = ref.get("attention_mask")
    means = {}
    for key in keys:
        axes = families[Site.parse(key).family].axes
        names = ("batch", *axes)
        if "batch" not in over or set(over) - set(names):
            raise ValueError(f"over={over} must hold 'batch' and only axes of {key} ({', '.join(names)})")
        value = run.cache[key].double()
        weight = torch.ones(value.shape[:1] + (1,) * len(axes), dtype=value.dtype, device=value.device)
        if mask is not None and "pos" in axes:
            shape = [value.shape[0]] + [1] * len(axes)
            shape[1 + axes.index("pos")] = mask.shape[1]
            weight = mask.to(value.dtype).view(shape)
        dims = [names.index(a) for a in over]
        count = weight.expand_as(value).sum(dim=dims, keepdim=True)
        mean = (value * weight).sum(dim=dims, keepdim=True) / torch.where(count > 0, count, torch.ones_like(count))
        shape = [1, *value.shape[1:]]  # the averaged axes broadcast back over the inputs' sizes
        if "pos" in axes:
            at = 1 + axes.index("pos")
            if "pos" not in over and mean.shape[at] != sizes.get("pos"):
                raise ValueError(
                    f"irrel='mean' per position needs reference inputs of the inputs' {sizes.get('pos')} positions; they "
                    f"have {mean.shape[at]} (or average over positions too: over=('batch', 'pos'))"
                )
            shape[at] = sizes.get("pos", shape[at])
        means[key] = mean.expand(shape).to(run.cache[key].dtype)
    return means


class _Visitor:
    """The ``visit`` callback of one run: sets each set's sources on its rows and reads the targets."""

    def __init__(self, members: list[tuple[Site, ...]], n: int, families: dict[str, NodeFamily],
                 means: dict[str, torch.Tensor], reads: list[Site] | None, direct: bool = False):
        self.n, self.families, self.means, self.reads = n, families, means, reads
        self.direct = direct
        self.sources: dict[str, list[tuple[int, Site]]] = {}
        for j, group in enumerate(members):
            for site in group:
                self.sources.setdefault(site.key, []).append((j, site))
        self.pending = None if reads is None else {site.key for site in reads}
        self.got: dict[str, Pair] = {}

    def __call__(self, key: str, pair: Pair) -> Pair:
        if self.direct and split_tower(Site.parse(key).family)[1] in _WRITERS:
            pair = (torch.zeros_like(pair[0]), pair[0] + pair[1])  # a later component: its relevance is context
        if key in self.sources:
            pair = self._set_sources(key, pair)
        if self.reads is None:
            self.got[key] = pair
            return pair
        for site in self.reads:
            if site.key == key:
                index = self._index(site, pair[0])
                self.got[str(site)] = (pair[0][index], pair[1][index])
        if key in self.pending:
            self.pending.discard(key)
            if not self.pending:
                raise _Done
        return pair

    def missing(self) -> list[str]:
        return sorted(self.pending or ())

    def _index(self, site: Site, value: torch.Tensor) -> tuple:
        axes = self.families[site.family].axes
        return (slice(None), *index_for(site, axes, value.shape[1:], value.device))

    def _set_sources(self, key: str, pair: Pair) -> Pair:
        rel, irrel = pair[0].clone(), pair[1].clone()
        n = self.n
        for j, site in self.sources[key]:
            index = self._index(site, rel)
            rows = slice(j * n, (j + 1) * n)
            r, i = rel[rows], irrel[rows]  # views: written in place
            total = r[index] + i[index]
            base = self.means[key].to(total.device)[index] if key in self.means else torch.zeros_like(total)
            r[index] = total - base
            i[index] = base.expand_as(total)
        return rel, irrel

