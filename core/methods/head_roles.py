"""Head roles: each head's total and direct effect, its sign, and how much it compensates when primary heads go.

The IOI paper (Wang et al. 2022) names three roles this module reads off exact edge patching
(:mod:`crosspatch.methods.edges`, ``activation_patching(direction="noising")``'s convention: the clean run
with chosen edges carrying the ablated, by default the corrupt run's, value):

* **total effect** of head ``h``: ``M(clean) - M(every edge out of h ablated)``, which is noising activation
  patching of ``head_out`` at ``h`` with the sign turned so that a head supporting the behaviour is positive;
* **direct effect**: ``M(clean) - M(the one edge h -> logits_in ablated)``: the change that reaches the logits
  through the residual stream alone, nothing after ``h`` recomputed from it (no later head, no MLP); the
  final norm is recomputed, so the value is exact, not a linearised logit attribution. This is the
  residual-stream direct path rather than path patching to the logits, because path patching lets the MLPs
  after the sender recompute (their change counts as direct there) and because the edge form composes with
  other ablations in the same forward, which the compensation below needs;
* **compensation** of ``h`` when a set ``S`` of primary heads is ablated (every edge out of ``S``):
  ``direct effect of h in that run - direct effect of h in the clean run``, where the direct effect in that run
  is ``M(S ablated) - M(S ablated and h -> logits_in ablated)``: how much more (or less) ``h`` now writes to the
  logits itself because ``S`` is gone.

Every value is divided by the gap ``M(clean) - M(every edge ablated)`` (the corrupt run under resample
ablation), so 1 is the whole behaviour and the sign is the behaviour's: a head is **negative** when its direct
effect is below ``-threshold`` (it pushes the metric against the behaviour), **backup** for ``S`` when its
compensation exceeds ``threshold`` and so does its direct effect with ``S`` ablated: it takes over, writing
towards the behaviour itself (a negative head that merely stops cancelling an ablated primary's write rises
too, but only back towards zero). Primaries are given, or the ``top_k`` heads by direct effect (the IOI
paper's name movers are found by their direct effect); each primary is ablated alone and, when there are
several, all together.

Cost: one clean forward with the prefix kept, then ``2 H + 2 + |sets| (H + 1)`` edge-patched row blocks for ``H``
heads, ``batch_size`` rows a forward.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..engine.model import WrappedModel, wrap
from ..progress import progress_bar
from ..results.metrics import Metric, MetricContext
from ..results.result import Result, collect_versions
from ..sites.site import Site, split_tower
from .edges import edge_graph
from .edges.patching import Ablation, EdgePatcher
from .pairs import check_gap, model_metric

__all__ = ["head_roles", "roles_of", "plot_head_roles"]


def head_roles(
    model: "WrappedModel | nn.Module",
    clean: Any,
    corrupt: Any,
    metric: "Metric | Callable",
    *,
    primaries: "Sequence[str] | None" = None,
    top_k: int = 2,
    threshold: float = 0.1,
    ablation: Ablation = "resample",
    reference: Any = None,
    batch_size: int = 64,
    progress: bool | None = None,
) -> Result:
    """Per head (every ``head_out`` sender of the model's edge graph): total and direct effect, and the direct
    effect and compensation when each primary (and, for several, all of them) is ablated; see the module docstring.

    ``primaries``: heads as ``"head_out.l[head=h]"`` (or ``"l.h"``), or MLPs (``"mlp_out.l"``: does a head take over
    from an MLP?); None picks the ``top_k`` heads by direct effect. ``threshold``: the fraction of the gap beyond which a head is negative or backup.
    Returns a Result with dims ``("head", "measure")``: measures ``total``, ``direct``, then per ablated set ``S``
    ``direct | without S`` and ``compensation | without S`` (NaN for the heads of ``S``). ``metadata["roles"]`` maps each head to
    its roles (``primary``, ``negative``, ``backup``: compensation and direct effect with ``S`` ablated both above
    ``threshold``), ``metadata["backup_for"]`` each backup head to the sets it compensates for, ``metadata["gap"]`` is the unnormalised gap. :func:`plot_head_roles` draws it.
    """
    if threshold < 0:
        raise ValueError(f"threshold is a fraction of the gap, >= 0; got {threshold}")
    m = wrap(model)
    metric = model_metric(m, metric)
    p = EdgePatcher(m, clean, corrupt, ablation, reference, edge_graph(m))
    g, n = p.graph, p.n
    heads = [i for i, s in enumerate(g.senders) if _role(s) == "head_out"]
    if not heads:
        raise ValueError(f"{m.catalog.model_name} has no head_out senders in its edge graph")
    names = [g.senders[i] for i in heads]
    logits_in = next(r for r, name in enumerate(g.receivers) if _role(name) == "logits_in")
    direct_edge = {s: e for e, (s, r) in enumerate(g.edges) if r == logits_in}
    out_edges: dict[int, list[int]] = {}
    for e, (s, _) in enumerate(g.edges):
        out_edges.setdefault(s, []).append(e)

    sizes = m.adapter.sizes(p.clean)
    at = metric.positions(MetricContext(torch.arange(n)), sizes)
    kept = p.keep_clean(at)
    clean_out = p.clean_out

    def rows(chunk: torch.Tensor) -> torch.Tensor:
        """The prompt-mean metric of the clean run under each mask of ``chunk``."""
        ctx = MetricContext(torch.arange(n).repeat(chunk.shape[0]), clean_out, None)
        output = p.run(chunk, metric.positions(ctx, sizes), kept)
        ctx.example = ctx.example.to(output.device)
        with torch.inference_mode():
            return metric(output, ctx).double().view(chunk.shape[0], n).mean(dim=1).cpu()

    def evaluate(masks: torch.Tensor, desc: str) -> torch.Tensor:
        chunks = torch.split(masks, max(1, batch_size // n))
        return torch.cat([rows(chunk) for chunk in progress_bar(chunks, progress, desc=desc)])

    def ablate(mask: torch.Tensor, senders: Sequence[int]) -> torch.Tensor:
        for s in senders:
            mask[out_edges[s]] = 1
        return mask

    zero = torch.zeros(len(g))
    masks = [zero, torch.ones(len(g))]
    masks += [ablate(zero.clone(), [s]) for s in heads]
    for s in heads:
        mask = zero.clone()
        mask[direct_edge[s]] = 1
        masks.append(mask)
    base = evaluate(torch.stack(masks), f"head roles: {len(heads)} heads")
    clean_metric, ablated_metric = float(base[0]), float(base[1])
    check_gap(clean_metric, ablated_metric, metric.name, ("clean", "every edge ablated"))
    gap = clean_metric - ablated_metric
    H = len(heads)
    total = (clean_metric - base[2 : 2 + H]).numpy() / gap
    direct = (clean_metric - base[2 + H : 2 + 2 * H]).numpy() / gap

    nodes = [name for name in g.senders if _role(name) != "embed"]
    chosen = _primaries(primaries, names, nodes, direct, top_k)
    sets = [[c] for c in chosen] + ([chosen] if len(chosen) > 1 else [])
    columns, labels = [total, direct], ["total", "direct"]
    backup_for: dict[str, list[str]] = {}
    for group in sets:
        senders = [g.senders.index(c) for c in group]
        masks = [ablate(zero.clone(), senders)]
        for s in heads:
            mask = ablate(zero.clone(), senders)
            mask[direct_edge[s]] = 1
            masks.append(mask)
        values = evaluate(torch.stack(masks), f"ablating {' + '.join(_short(c) for c in group)}")
        after = (float(values[0]) - values[1:]).numpy() / gap
        after[[names.index(c) for c in group if c in names]] = np.nan
        compensation = after - direct
        label = " + ".join(_short(c) for c in group)
        columns += [after, compensation]
        labels += [f"direct | without {label}", f"compensation | without {label}"]
        for name, value, now in zip(names, compensation, after):
            if np.isfinite(value) and value > threshold and now > threshold:
                backup_for.setdefault(name, []).append(label)

    roles = {name: [] for name in names}
    for c in chosen:
        if c in roles:
            roles[c].append("primary")
    for name, value in zip(names, direct):
        if value < -threshold:
            roles[name].append("negative")
    for name in backup_for:
        roles[name].append("backup")
    metadata = {
        "method": "head_roles",
        "metric": metric.name,
        "normalize": True,
        "gap": gap,
        "clean_metric": clean_metric,
        "ablated_metric": ablated_metric,
        "ablation": ablation,
        "threshold": threshold,
        "primaries": chosen,
        "ablated_sets": [" + ".join(_short(c) for c in group) for group in sets],
        "roles": roles,
        "backup_for": backup_for,
        "direct_effect": "exact patching of the edge head -> logits_in (the residual-stream direct path)",
        "n_prompts": n,
        "seed": None,
        "model": m.describe(),
        "adapter": m.adapter.name,
        "versions": collect_versions(),
    }
    return Result(np.stack(columns, axis=1), ("head", "measure"), {"head": names, "measure": labels}, metadata)


def roles_of(result: Result, role: str) -> list[str]:
    """The heads holding ``role`` (``primary``, ``negative`` or ``backup``) in a :func:`head_roles` Result."""
    if role not in ("primary", "negative", "backup"):
        raise ValueError(f"role must be 'primary', 'negative' or 'backup', got {role!r}")
    return [head for head, held in result.metadata["roles"].items() if role in held]


#: Beyond this many heads (and with no ``ax`` given) the plot shows layer x head maps instead of bars.
MAX_BARS = 32


def plot_head_roles(result: Result, ax: Any = None, *, title: str | None = None) -> Any:
    """Grouped bars per head: total effect, direct effect, and the direct effect once every primary is ablated
    (the last ablated set), as fractions of the gap; tick labels carry each head's roles. With more than
    :data:`MAX_BARS` heads and no ``ax``, the same three measures as layer x head maps, roles marked in their
    cells (bars that many would be too thin to read)."""
    from matplotlib.figure import Figure

    heads = list(result.coords["head"])
    measures = list(result.coords["measure"])
    last = result.metadata["ablated_sets"][-1]
    shown = [("total", "total effect", "0.6"), ("direct", "direct effect", "tab:blue"),
             (f"direct | without {last}", f"direct effect, {last} ablated", "tab:orange")]
    if ax is None and len(heads) > MAX_BARS:
        return _plot_maps(result, heads, measures, shown, title)
    if ax is None:
        figure = Figure(figsize=(max(6.0, 0.75 * len(heads) + 2), 4.2), layout="constrained")
        ax = figure.add_subplot()
    figure = ax.figure
    x = np.arange(len(heads))
    width = 0.27
    for j, (measure, label, colour) in enumerate(shown):
        raw = result.values[:, measures.index(measure)]
        ax.bar(x + (j - 1) * width, np.nan_to_num(raw), width, label=label, color=colour, edgecolor="0.3", linewidth=0.4)
        for i in np.flatnonzero(np.isnan(raw)):  # a head of the ablated set
            ax.text(x[i] + (j - 1) * width, 0, " ablated", rotation=90, fontsize=7, ha="center", va="bottom", color=colour)
    ax.axhline(0.0, color="0.2", linewidth=0.8)
    threshold = result.metadata["threshold"]
    for y in (threshold, -threshold):
        ax.axhline(y, color="0.5", linewidth=0.6, linestyle=":")
    roles = result.metadata["roles"]
    ax.set_xticks(x, [_short(h) + ("\n" + ", ".join(roles[h]) if roles[h] else "") for h in heads], fontsize=8)
    ax.set_xlabel("head (layer.head) and role")
    ax.set_ylabel(f"{result.metadata['metric']} / gap")
    ax.legend(fontsize=8, loc="best")
    ax.set_title(title or f"head roles (threshold {threshold:g} of the gap, dotted)")
    return figure


def _plot_maps(result: Result, heads: list[str], measures: list[str], shown: list[tuple[str, str, str]],
               title: str | None) -> Any:
    """``plot_head_roles`` for many heads: one layer x head map per measure, each on its own diverging colour
    scale symmetric about 0 and at least the threshold wide (blue supports the behaviour, red opposes it, grey
    an ablated head; a shared scale would hide the direct effects next to the totals), roles' initials in
    their cells."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    sites = [Site.parse(h) for h in heads]
    layers = sorted({s.layer for s in sites})
    width = max(s.selection["head"] for s in sites) + 1
    grids = []
    for measure, _, _ in shown:
        grid = np.full((len(layers), width), np.nan)
        for site, value in zip(sites, result.values[:, measures.index(measure)]):
            grid[layers.index(site.layer), site.selection["head"]] = value
        grids.append(grid)
    threshold = result.metadata["threshold"]
    cmap = colormaps["RdBu"].copy()
    cmap.set_bad("0.75")
    figure = Figure(figsize=(min(20.0, 1.5 + 0.3 * width * len(shown)), 1.6 + 0.38 * len(layers)), layout="constrained")
    axes = figure.subplots(1, len(shown), sharey=True)
    roles = result.metadata["roles"]
    for ax, grid, (_, label, _) in zip(axes, grids, shown):
        scale = max(threshold, float(np.nanmax(np.abs(grid), initial=0.0)))
        image = ax.imshow(grid, cmap=cmap, vmin=-scale, vmax=scale, aspect="auto", interpolation="nearest")
        figure.colorbar(image, ax=ax, shrink=0.9, pad=0.01)
        for name, site in zip(heads, sites):
            if roles[name]:
                ax.text(site.selection["head"], layers.index(site.layer), "".join(r[0].upper() for r in roles[name]),
                        ha="center", va="center", fontsize=7, color="k")
        ax.set_title(label, fontsize=9)
        ax.set_xticks(range(width), [str(h) for h in range(width)], fontsize=6)
        ax.set_xlabel("head")
    axes[0].set_yticks(range(len(layers)), [str(layer) for layer in layers], fontsize=7)
    axes[0].set_ylabel("layer")
    figure.suptitle((title + "\n" if title else "") + f"{result.metadata['metric']} / gap; P primary, N negative, "
                    f"B backup (threshold {threshold:g} of the gap)", fontsize=10)
    return figure


def _role(key: str) -> str:
    """A sender or receiver key's family without its tower prefix: ``head_out``, ``logits_in``, ``embed`` …"""
    return split_tower(Site.parse(key).family)[1]


def _primaries(given: "Sequence[str] | None", names: list[str], nodes: list[str], direct: np.ndarray,
               top_k: int) -> list[str]:
    if given is None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1 when no primaries are given, got {top_k}")
        order = np.argsort(-direct, kind="stable")[:top_k]
        return [names[i] for i in order]
    out = []
    for head in given:
        name = _full(head, names)
        if name not in nodes:
            raise ValueError(f"primary {head!r} is not a head or MLP of the model; heads: {', '.join(map(_short, names))}; "
                             f"MLPs: {', '.join(x for x in nodes if x not in names)}")
        out.append(name)
    if not out:
        raise ValueError("primaries is empty: give at least one head, or None to pick the top_k by direct effect")
    return list(dict.fromkeys(out))


def _short(name: str) -> str:
    """``head_out.1[head=2]`` -> ``1.2``; an MLP keeps its name."""
    site = Site.parse(name)
    return f"{site.layer}.{site.selection['head']}" if "head" in site.selection else name


def _full(head: str, names: list[str]) -> str:
    """``"1.2"`` or any spelling of the site -> the graph's sender name."""
    text = str(head)
    if "[" not in text and text.count(".") == 1 and all(part.strip().isdigit() for part in text.split(".")):
        for name in names:
            if _short(name) == text.strip():
                return name
        return text
    return str(Site.parse(text))
