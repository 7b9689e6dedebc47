"""CD-T's circuit search at (layer, position, head) granularity (Hsu et al., ICLR 2025, arXiv 2407.00886).

The nodes are the edge graph's components split by position: senders ``embed[pos=p]``, ``head_out.l[pos=p,head=h]``
(a head at one query position, set at its ``head_z``) and ``mlp_out.l[pos=p]``; receivers a head's query input at its
position, its key and value inputs at each key position (``head_in.l[pos=p,qkv=r,head=h]``), an MLP's input
``mlp_in.l[pos=p]`` and the output ``logits_in[pos=p]``, each read where the component search reads it (``head_q`` /
``head_k`` / ``head_v``, ``mlp_act``, ``logits``) at that position. The score of a node edge is the component
search's score taken at the receiver's position: ``||rel|| / ||rel + irrel||`` there (averaged over prompts), or with
a metric at the logits ``metric(rel at p only) / metric(model)``.

The search is the component one (:mod:`.cdt_circuit`) on these nodes: the output's receivers first, a sender kept at
``|score| >= threshold``; a kept head node at query position ``p`` opens its query receiver at ``p`` and its key and
value receivers at every key position ``p'`` it attends to (the model's pattern is nonzero there for some prompt); a
kept MLP node opens its input at its own position. One :func:`~crosspatch.methods.cdt.decompose` call a level, its
targets whole families (one read gives every position and head).

**Packing positions (paths="direct").** With direct relevance nothing mixes positions between a sender's write and a
receiver's read: the write goes through the residual at its own position, and the norms, projections, activations and
unembedding act per position, while every later head and MLP is cut. So the relevant part at position ``p`` of a
source set holding a component at *every* position is exactly that of the node at ``p`` alone, for any baseline. The
direct search therefore sets each candidate component at every position (one source set, as the component search) and
reads each node's score at its own position: the node search costs what the component search costs. With
``paths="all"`` attention moves relevance between positions, so each node is its own source set.
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

import numpy as np
import torch

from ..engine.adapter import batch_size as batch_size_of
from ..engine.model import WrappedModel
from ..results.metrics import Metric, MetricContext
from ..results.result import Result
from ..sites.site import Site, Span, split_tower
from .cdt import decompose
from .cdt_circuit_common import search_metadata
from .edges import EdgeGraph

__all__ = ["node_circuit", "node_scores", "to_components", "at_position", "without_position"]


def at_position(name: str, pos: int) -> str:
    """A component's node at one position: ``head_out.1[head=2]`` -> ``head_out.1[pos=3,head=2]``."""
    site = Site.parse(name)
    return str(Site(site.family, site.layer, (("pos", pos), *((a, v) for a, v in site.sel if a != "pos"))))


def without_position(name: str) -> str:
    """A node's component: ``head_out.1[pos=3,head=2]`` -> ``head_out.1[head=2]``."""
    site = Site.parse(name)
    return str(Site(site.family, site.layer, tuple((a, v) for a, v in site.sel if a != "pos")))


def _target_family(receiver: str) -> tuple[str, Any]:
    """The whole-family target a component receiver is read in, and its head index there (None: no head axis)."""
    site = Site.parse(receiver)
    tower, role = split_tower(site.family)
    if role == "head_in":
        head = site.selection["head"]
        first = head.start if isinstance(head, Span) else int(head)  # a key/value head: its first query head's copy
        return f"{tower}head_{'qkv'[int(site.selection['qkv'])]}.{site.layer}", first
    if role == "mlp_in":
        return f"{tower}mlp_act.{site.layer}", None
    if role == "logits_in":
        return f"{tower}logits", None
    raise ValueError(f"{receiver} is not a receiver of an edge graph (head_in, mlp_in or logits_in)")


def node_circuit(
    m: WrappedModel,
    prepared: Any,
    metric: Metric | None,
    *,
    graph: EdgeGraph,
    receivers_of: dict[int, list[int]],
    threshold: float,
    irrel: Literal["zero", "mean"],
    reference: Any,
    over: Sequence[str],
    paths: Literal["direct", "all"],
    batch_size: int | None,
    progress: bool | None,
) -> Result:
    """The node-level search (see the module docstring); :func:`~crosspatch.methods.cdt_circuit.cdt_circuit` with
    ``granularity="node"`` calls it. The Result holds the *scored* node edges (dim ``edge``); every other edge of the
    node graph scores 0. ``metadata["senders"]`` lists every sender node (for :func:`node_scores`)."""
    g = graph
    n = batch_size_of(prepared)
    mask = prepared.get("attention_mask")
    if mask is not None and not bool(mask.bool().all()):
        raise ValueError(
            "granularity='node' needs inputs of one length without padding (a node is a position, which must mean the "
            "same token slot in every prompt: group the prompts by template); got an attention_mask with padding"
        )
    n_pos = int(m.adapter.sizes(prepared)["pos"])
    incoming: dict[int, list[int]] = {}
    for s, r in g.edges:
        incoming.setdefault(r, []).append(s)
    keys = _attended(m, prepared, g)  # (layer, query head) -> [pos, key_pos] bool

    rows: dict[tuple[int, int, int, int], float] = {}  # (sender, sender pos, receiver, receiver pos) -> score
    kept_nodes: set[tuple[int, int]] = set()
    searched: set[tuple[int, int]] = set()
    opened_by: dict[tuple[int, int], set[tuple[int, int]]] = {}  # receiver node -> the kept nodes whose input it is
    levels: list[list[str]] = []
    decompositions = 0
    logits_receivers = [r for r, name in enumerate(g.receivers) if split_tower(Site.parse(name).family)[1] == "logits_in"]
    frontier = [(r, p) for r in logits_receivers for p in range(n_pos)]
    while frontier:
        searched.update(frontier)
        levels.append([at_position(g.receivers[r], p) for r, p in frontier])
        targets = sorted({_target_family(g.receivers[r])[0] for r, _ in frontier})
        components = sorted({s for r, _ in frontier for s in incoming[r]})
        if paths == "direct":  # packed: a component at every position is one set (see the module docstring)
            sets = [(s, None) for s in components]
            source_sets = [[g.senders[s]] for s in components]
        else:
            sets = [(s, p) for s in components for p in range(n_pos)]
            source_sets = [[at_position(g.senders[s], p)] for s, p in sets]
        dec = decompose(m, prepared, source_sets, targets, irrel=irrel, reference=reference, over=over,
                        batch_size=batch_size, progress=progress, direct=paths == "direct")
        decompositions += len(source_sets) * len(targets)
        positions = sorted({p for r, p in frontier if r in logits_receivers})
        tables = {t: _scores(dec.rel[t], dec.irrel[t], t, metric, n, mask, positions) for t in targets}
        slot = {key: j for j, key in enumerate(sets)}
        following: dict[tuple[int, int], None] = {}  # the next level's receivers, in the order they were opened
        for r, p_r in frontier:
            target, head = _target_family(g.receivers[r])
            table = tables[target]  # [sets, pos] or [sets, pos, head]
            for s in incoming[r]:
                for p_s in ([p_r] if paths == "direct" else range(n_pos)):
                    j = slot[(s, None) if paths == "direct" else (s, p_s)]
                    value = float(table[j, p_r] if head is None else table[j, p_r, head])
                    if paths == "all" and value == 0:
                        continue  # no path from this position (a causal mask): not an edge worth listing
                    rows[(s, p_s, r, p_r)] = value
                    if value != 0 and abs(value) >= threshold and (s, p_s) not in kept_nodes:
                        kept_nodes.add((s, p_s))
                        for nxt in _opened(g, s, p_s, receivers_of, keys):
                            opened_by.setdefault(nxt, set()).add((s, p_s))
                            if nxt not in searched:
                                following[nxt] = None
        frontier = list(following)

    order = sorted(rows, key=lambda k: (g._stage(g.receivers[k[2]]), k[3], k[2], g._stage(g.senders[k[0]]), k[1], k[0]))
    names = [f"{at_position(g.senders[s], ps)}->{at_position(g.receivers[r], pr)}" for s, ps, r, pr in order]
    values = np.array([rows[k] for k in order], dtype=float)
    kept = [name for name, v in zip(names, values) if v != 0 and abs(v) >= threshold]
    senders = [at_position(name, p) for name in g.senders for p in range(n_pos)]
    metadata = search_metadata(
        m, metric, granularity="node", threshold=threshold, irrel=irrel, paths=paths,
        score="metric(rel at the position) / metric(model) at the logits" if metric is not None else
              "norm(rel) / norm(rel + irrel) at the receiver's target, at its position",
        kept=kept, nodes=sorted({at_position(g.senders[s], p) for s, p in kept_nodes} |
                                {at_position(g.receivers[r], p) for r, p in searched}),
        senders=senders, levels=levels, scored=names, decompositions=decompositions, n_prompts=n, positions=n_pos,
        opened={at_position(g.receivers[r], p): sorted(at_position(g.senders[s], q) for s, q in by)
                for (r, p), by in opened_by.items()},
    )
    return Result(values, ("edge",), {"edge": names}, metadata)


def _attended(m: WrappedModel, prepared: Any, g: EdgeGraph) -> dict[tuple[int, int], torch.Tensor]:
    """Per (layer, head): which key positions each query position attends to with nonzero weight in some prompt."""
    layers = sorted({int(Site.parse(name).layer) for name in g.receivers if split_tower(Site.parse(name).family)[1] == "head_in"})
    family = f"{g.tower}attn_pattern"
    if family not in m.catalog:  # no pattern to read: every key position counts as attended
        n_pos, n_heads = int(m.adapter.sizes(prepared)["pos"]), m.catalog.family(f"{g.tower}head_out").axis("head").size
        every = torch.ones(n_pos, n_pos, dtype=torch.bool)
        return {(layer, h): every for layer in layers for h in range(n_heads)}
    cache = m.capture(prepared, [f"{family}.{layer}" for layer in layers])
    out = {}
    for layer in layers:
        pattern = cache[f"{family}.{layer}"]  # [prompts, head, pos, key_pos]
        attended = (pattern != 0).any(dim=0).cpu()
        for h in range(attended.shape[0]):
            out[(layer, h)] = attended[h]
    return out


def _opened(g: EdgeGraph, s: int, p: int, receivers_of: dict[int, list[int]],
            keys: dict[tuple[int, int], torch.Tensor]) -> list[tuple[int, int]]:
    """The node receivers a kept sender node opens: its query at its position, its keys and values where it attends,
    an MLP's input at its position (the embedding opens none)."""
    site = Site.parse(g.senders[s])
    out: list[tuple[int, int]] = []
    for r in receivers_of.get(s, []):
        receiver = Site.parse(g.receivers[r])
        if split_tower(receiver.family)[1] == "head_in" and int(receiver.selection["qkv"]) > 0:
            attended = keys[(int(site.layer), int(site.selection["head"]))][p]
            out += [(r, int(k)) for k in torch.nonzero(attended).flatten().tolist()]
        else:
            out.append((r, p))
    return out


def _scores(rel: torch.Tensor, irrel: torch.Tensor, target: str, metric: Metric | None, n: int,
            mask: torch.Tensor | None, positions: list[int]) -> torch.Tensor:
    """Per source set and position (and head, for a head's query, key or value): the node score, on the CPU."""
    sets = rel.shape[0]
    if metric is not None and Site.parse(target).family.endswith("logits"):
        full = rel[0] + irrel[0]
        ctx = MetricContext(torch.arange(n, device=rel.device), full, mask)
        rows = MetricContext(torch.arange(n, device=rel.device).repeat(sets), full,
                             None if mask is None else mask.repeat(sets, 1))
        out = torch.zeros(sets, rel.shape[2], dtype=torch.float64)
        with torch.inference_mode():
            whole = float(metric(full, ctx).double().mean())
            whole = whole if whole != 0 else 1.0
            flat = rel.flatten(0, 1)
            for p in positions:
                only = torch.zeros_like(flat)
                only[:, p] = flat[:, p]
                out[:, p] = (metric(only, rows).double().view(sets, n).mean(dim=1) / whole).cpu()
        return out
    size = rel.double().pow(2).sum(dim=-1).sqrt()  # [sets, prompts, pos, (head)]
    whole = (rel + irrel).double().pow(2).sum(dim=-1).sqrt()
    return (size / torch.where(whole > 0, whole, torch.ones_like(whole))).mean(dim=1).cpu()


def node_scores(result: Result, rule: Literal["path", "edge"] = "path") -> Result:
    """Per sender node of a circuit search (either granularity), a score for ranking nodes (0 for a node never scored),
    e.g. for a ROC against ground-truth nodes (``circuit_eval.roc(..., level="node")``).

    ``rule="path"`` (the default): the largest product of ``|edge score|`` along a searched path from the node to the
    output, i.e. ``max over its edges s -> r of |score(s -> r)| * importance(r)``, where the output's receivers have
    importance 1 and another receiver the importance of the kept node whose input it is (``metadata["opened"]``): a
    share of a receiver counts as much as that receiver's node counts. ``rule="edge"``: the node's largest
    ``|edge score|``, whatever its receiver's node is worth. On ioi-gpt2-tiny the path rule ranks nodes by their exact
    effect with AUC 0.996 against 0.898 (``benchmarks/cdt_circuit.md``)."""
    senders = result.metadata.get("senders")
    if senders is None:
        raise ValueError("node_scores reads a cdt_circuit Result (its metadata lists the senders)")
    if rule not in ("path", "edge"):
        raise ValueError(f"rule must be 'path' (products along paths to the output) or 'edge', got {rule!r}")
    edges = [(*name.split("->"), abs(float(v))) for name, v in zip(result.coords["edge"], np.asarray(result.values))]
    best = dict.fromkeys(senders, 0.0)
    if rule == "edge":
        for sender, _, value in edges:
            best[sender] = max(best[sender], value)
    else:
        opened = result.metadata.get("opened")
        if opened is None:
            raise ValueError("rule='path' needs the receivers each kept node opened (metadata['opened']); use rule='edge'")
        into: dict[str, list[tuple[str, float]]] = {}
        for sender, receiver, value in edges:
            into.setdefault(receiver, []).append((sender, value))
        # Receivers from the output back: a receiver's node only sends to later receivers, all settled by then.
        for receiver in sorted(into, key=EdgeGraph._stage, reverse=True):
            if split_tower(Site.parse(receiver).family)[1] == "logits_in":
                weight = 1.0
            else:
                weight = max((best[node] for node in opened.get(receiver, [])), default=0.0)
            for sender, value in into[receiver]:
                best[sender] = max(best[sender], value * weight)
    metadata = {**result.metadata, "method": "cdt_circuit node scores", "rule": rule,
                "score": "max |edge score| x its receiver's importance" if rule == "path" else "max |edge score|"}
    for key in ("kept", "scored", "levels", "opened"):
        metadata.pop(key, None)
    return Result(np.array(list(best.values())), ("node",), {"node": list(best)}, metadata)


def to_components(result: Result, graph: EdgeGraph) -> Result:
    """A node-level search's edges collapsed onto the component edge graph: each component edge scores the largest
    ``|score|`` of its node edges (0 when none was scored). A ranking, not the component search's score (that one is a
    share over every position at once; ``docs/cdt.md`` states how the two relate)."""
    if result.metadata.get("granularity") != "node":
        raise ValueError("to_components reads a node-level cdt_circuit Result (granularity='node')")
    index = {name: e for e, name in enumerate(graph.edge_names)}
    values = np.zeros(len(index))
    for name, value in zip(result.coords["edge"], np.asarray(result.values, dtype=float)):
        sender, receiver = name.split("->")
        e = index[f"{without_position(sender)}->{without_position(receiver)}"]
        values[e] = max(values[e], abs(float(value)))
    metadata = {**result.metadata, "granularity": "component (collapsed from nodes)"}
    metadata["kept"] = sorted({f"{without_position(a)}->{without_position(b)}" for a, b in
                               (k.split("->") for k in result.metadata["kept"])})
    return Result(values, ("edge",), {"edge": list(graph.edge_names)}, metadata)
