"""CD-T circuit discovery (Hsu et al., ICLR 2025): recursive source-to-target scoring with pruning, on the edge graph.

The paper's search: decompose the output with every earlier node as a source (one source set each), keep the
sources whose relevance passes a threshold, make each kept node's *input* a target, score every node before it
against that target, keep, and recurse until only the embeddings are left. Here the nodes and edges are those of
:func:`~crosspatch.methods.edges.edge_graph` (senders ``embed``, ``head_out.l[head=h]``, ``mlp_out.l``; receivers a
head's query, key and value input, an MLP's input, ``logits_in``), so the result is a score per edge, comparable
with EAP's and ACDC's on the same graph:

* a sender is a CD-T source at every position (a head's write is set at its ``head_z`` where the catalog has it);
* a receiver is read where the receiving node has turned its input into its own computation, so that only what it
  reads counts: a head's query / key / value input at ``head_q`` / ``head_k`` / ``head_v`` (after the norm and the
  projection), an MLP's input at ``mlp_act`` (its neurons), ``logits_in`` at ``logits``;
* the score of edge ``s -> r`` is the relevance of source ``s`` at ``r``'s target: ``||rel|| / ||rel + irrel||`` over
  the target (every position; averaged over prompts), or with a ``metric`` at the logits ``metric(rel) / metric(model)``
  (prompt means; a metric linear in the logits such as ``logit_diff`` makes it the source's share of the model's value).

The search starts with ``logits_in``; a sender whose edge into a current target scores ``|score| >= threshold`` is
kept, and its receivers (the three inputs of a head, the input of an MLP) are the next level's targets. Edges into
receivers never reached are not scored and get 0: they rank below every scored edge (the pruning). One level is one
:func:`~crosspatch.methods.cdt.decompose` call: every candidate source set against every target of the level, the
source sets batched as rows, each run stopping once its targets are read.

``granularity="node"`` runs the same search on the paper's (layer, position, head) and (layer, position) MLP nodes
(:mod:`.cdt_circuit_nodes`); the default stays the components above, the graph EAP and ACDC score. Both record which
kept node opened each receiver (``metadata["opened"]``), from which :func:`~.cdt_circuit_nodes.node_scores` ranks nodes.
"""

from __future__ import annotations

from typing import Any, Callable, Literal, Sequence

import numpy as np
import torch
from torch import nn

from ..engine.adapter import batch_size as batch_size_of
from ..engine.model import WrappedModel, wrap
from ..results.metrics import Metric, MetricContext
from ..results.result import Result
from ..sites.site import Site, Span, split_tower
from .cdt import decompose
from .cdt_circuit_common import search_metadata
from .cdt_circuit_nodes import node_circuit
from .edges import EdgeGraph, edge_graph
from .pairs import model_metric

__all__ = ["cdt_circuit", "receiver_target"]


def receiver_target(receiver: str) -> str:
    """The CD-T target a receiver of the edge graph is read at (see the module docstring)."""
    site = Site.parse(receiver)
    tower, role = split_tower(site.family)
    if role == "head_in":
        sel = site.selection
        return f"{tower}head_{'qkv'[int(sel['qkv'])]}.{site.layer}[head={sel['head']}]"
    if role == "mlp_in":
        return f"{tower}mlp_act.{site.layer}"
    if role == "logits_in":
        return f"{tower}logits"
    raise ValueError(f"{receiver} is not a receiver of an edge graph (head_in, mlp_in or logits_in)")


def cdt_circuit(
    model: "WrappedModel | nn.Module",
    inputs: Any,
    metric: "Metric | Callable | None" = None,
    *,
    threshold: float = 0.05,
    irrel: Literal["zero", "mean"] = "zero",
    reference: Any = None,
    over: Sequence[str] = ("batch",),
    paths: Literal["direct", "all"] = "direct",
    graph: EdgeGraph | None = None,
    granularity: Literal["component", "node"] = "component",
    batch_size: int | None = None,
    progress: bool | None = None,
) -> Result:
    """CD-T's circuit as a score per edge of the edge graph (0 for edges whose receiver the search never reached).

    ``granularity``: ``"component"`` (the default): a node is a head or an MLP at every position, the edge graph EAP,
    ACDC and the learned masks score, so the results compare edge for edge and inputs may be padded. ``"node"``: the
    paper's (layer, position, head) and (layer, position) MLP nodes (:mod:`.cdt_circuit_nodes`); inputs of one length
    without padding; the Result lists the scored node edges only (``node_scores`` ranks the nodes, ``to_components``
    collapses onto the edge graph).

    ``threshold``: the ``|score|`` a sender needs at a target to be kept and searched further (scores are shares of
    the target's norm, or of the model's metric). ``irrel``, ``reference`` and ``over``: the sources' baseline, as
    :func:`~crosspatch.methods.cdt.decompose`. ``metadata``: ``kept`` (edges at or above the threshold), ``nodes``
    (senders kept, ``logits_in`` and the receivers searched), ``levels`` (receivers searched per level),
    ``decompositions`` (source sets x targets read), ``scored`` (edges given a score).
    """
    if threshold < 0:
        raise ValueError(f"threshold is a share, >= 0; got {threshold}")
    if paths not in ("direct", "all"):
        raise ValueError(f"paths must be 'direct' (the edge's own score) or 'all' (the paper's), got {paths!r}")
    if granularity not in ("component", "node"):
        raise ValueError(f"granularity must be 'component' (heads and MLPs) or 'node' (per position), got {granularity!r}")
    m = wrap(model)
    g = graph or edge_graph(m)
    prepared = m.prepare(inputs)
    n = batch_size_of(prepared)
    metric = None if metric is None else model_metric(m, metric)
    if granularity == "node":
        return node_circuit(m, prepared, metric, graph=g, receivers_of=_receivers_of(g), threshold=threshold,
                            irrel=irrel, reference=reference, over=over, paths=paths, batch_size=batch_size,
                            progress=progress)
    incoming: dict[int, list[int]] = {}
    edge_of: dict[tuple[int, int], int] = {}
    for e, (s, r) in enumerate(g.edges):
        incoming.setdefault(r, []).append(s)
        edge_of[(s, r)] = e
    reads_of = _receivers_of(g)

    scores = np.zeros(len(g.edges))
    scored = np.zeros(len(g.edges), dtype=bool)
    kept_senders: set[int] = set()
    levels: list[list[str]] = []
    searched: set[int] = set()
    opened_by: dict[int, set[int]] = {}  # receiver -> the kept senders whose node it is an input of
    frontier = [r for r, name in enumerate(g.receivers) if split_tower(Site.parse(name).family)[1] == "logits_in"]
    decompositions = 0
    while frontier:
        searched.update(frontier)
        levels.append([g.receivers[r] for r in frontier])
        targets = [receiver_target(g.receivers[r]) for r in frontier]
        candidates = sorted({s for r in frontier for s in incoming[r]})
        dec = decompose(m, prepared, [[g.senders[s]] for s in candidates], targets, irrel=irrel, reference=reference,
                        over=over, batch_size=batch_size, progress=progress, direct=paths == "direct")
        decompositions += len(candidates) * len(targets)
        following: list[int] = []
        for r, target in zip(frontier, targets):
            values = _relevance(dec.rel[_key(dec.rel, target)], dec.irrel[_key(dec.rel, target)], target, metric, n,
                                prepared.get("attention_mask"))
            for s in incoming[r]:
                e = edge_of[(s, r)]
                scores[e], scored[e] = values[candidates.index(s)], True
                if abs(scores[e]) >= threshold and scores[e] != 0:
                    kept_senders.add(s)
                    for r2 in reads_of.get(s, []):
                        opened_by.setdefault(r2, set()).add(s)
                    following += [r2 for r2 in reads_of.get(s, []) if r2 not in searched and r2 not in following]
        frontier = following

    names = g.edge_names
    kept = [names[e] for e in range(len(names)) if scored[e] and abs(scores[e]) >= threshold and scores[e] != 0]
    metadata = search_metadata(
        m, metric, granularity="component", threshold=threshold, irrel=irrel, paths=paths,
        score="metric(rel) / metric(model) at the logits" if metric is not None else
              "norm(rel) / norm(rel + irrel) at the receiver's target",
        kept=kept, nodes=sorted({g.senders[s] for s in kept_senders} | {g.receivers[r] for r in searched}),
        senders=list(g.senders), levels=levels, scored=[names[e] for e in np.flatnonzero(scored)],
        decompositions=decompositions, n_prompts=n,
        opened={g.receivers[r]: sorted(g.senders[s] for s in by) for r, by in opened_by.items()},
    )
    return Result(scores, ("edge",), {"edge": names}, metadata)


def _receivers_of(g: EdgeGraph) -> dict[int, list[int]]:
    """Per sender, the receivers of the node it is the output of (a head's three inputs, an MLP's input)."""
    by_node: dict[tuple[str, Any, Any], list[int]] = {}
    for r, name in enumerate(g.receivers):
        site = Site.parse(name)
        role = split_tower(site.family)[1]
        if role == "head_in":  # a key/value head under grouped-query attention reads for its query heads a:b
            head = site.selection["head"]
            heads = range(head.start, head.stop) if isinstance(head, Span) else [head]
            for h in heads:
                by_node.setdefault(("head", site.layer, h), []).append(r)
        elif role == "mlp_in":
            by_node.setdefault(("mlp", site.layer, None), []).append(r)
    out: dict[int, list[int]] = {}
    for s, name in enumerate(g.senders):
        site = Site.parse(name)
        role = split_tower(site.family)[1]
        if role == "head_out":
            out[s] = by_node.get(("head", site.layer, site.selection["head"]), [])
        elif role == "mlp_out":
            out[s] = by_node.get(("mlp", site.layer, None), [])
    return out


def _key(table: dict[str, torch.Tensor], target: str) -> str:
    """The decomposition's key for a target as written (the method keys by the resolved site's string)."""
    if target in table:
        return target
    want = Site.parse(target)
    for key in table:
        site = Site.parse(key)
        if (site.family, site.layer) == (want.family, want.layer) and \
                {a: str(v) for a, v in site.selection.items()} == {a: str(v) for a, v in want.selection.items()}:
            return key
    raise KeyError(f"the decomposition has no target {target}; it has {sorted(table)}")


def _relevance(rel: torch.Tensor, irrel: torch.Tensor, target: str, metric: Metric | None, n: int,
               mask: torch.Tensor | None) -> np.ndarray:
    """One score per source set: a norm share over the target, or the metric's share at the logits."""
    sets = rel.shape[0]
    if metric is not None and Site.parse(target).family.endswith("logits"):
        full = rel[0] + irrel[0]
        repeated = None if mask is None else mask.repeat(sets, 1)
        with torch.inference_mode():
            part = metric(rel.flatten(0, 1), MetricContext(torch.arange(n, device=rel.device).repeat(sets), full, repeated))
            whole = metric(full, MetricContext(torch.arange(n, device=rel.device), full, mask))
        denominator = float(whole.double().mean())
        denominator = denominator if denominator != 0 else 1.0
        return (part.double().view(sets, n).mean(dim=1) / denominator).cpu().numpy()
    axes = tuple(range(2, rel.ndim))
    size = rel.double().pow(2).sum(dim=axes).sqrt()
    whole = (rel + irrel).double().pow(2).sum(dim=axes).sqrt()
    return (size / torch.where(whole > 0, whole, torch.ones_like(whole))).mean(dim=1).cpu().numpy()
