"""Influence, pruning and the replacement / completeness scores, as circuit-tracer defines them, on sparse matrices.

With ``N`` the adjacency with absolute values, each row divided by its sum (so a node's inputs share
1), and ``w`` the targets' weights at their nodes, a node's *influence* on the targets is
``(w N + w N^2 + ...)``, i.e. ``w [(I - N)^-1 - I]``: the graph is acyclic, ``N`` nilpotent, so the
Neumann series ends after at most depth-many terms (:func:`influence`). :func:`prune` keeps the nodes
holding ``node_threshold`` of the total influence (tokens and targets always), then the edges holding
``edge_threshold`` of the edge influence (``N[t, s]`` times ``t``'s influence plus its weight, on the
node-pruned graph), then removes, until nothing changes, feature and error nodes left without an
outgoing edge and feature nodes without an incoming one. :func:`scores` gives the replacement score
(of the tokens' and errors' influence, the tokens' share) and the completeness score (the
influence-weighted share of each node's normalised inputs not coming from errors).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .graph import AttributionGraph
from .influence import _sparse, influence, normalize

__all__ = ["normalize", "influence", "find_threshold", "prune", "Pruned", "scores"]


def find_threshold(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """The score above which the largest scores hold ``threshold`` of their total."""
    ordered = scores.sort(descending=True).values
    cumulative = ordered.cumsum(0) / ordered.sum().clamp_min(1e-300)
    index = min(int(torch.searchsorted(cumulative, torch.tensor(threshold, dtype=cumulative.dtype))), len(ordered) - 1)
    return ordered[index]


@dataclass
class Pruned:
    """Which nodes and edges a pruning keeps, and each node's cumulative influence rank (in [0, 1])."""

    node_mask: torch.Tensor  # [n_nodes] bool
    edges: torch.Tensor  # sparse COO: the kept entries of the adjacency
    cumulative: torch.Tensor  # [n_nodes]: share of the total influence held by nodes at least as influential
    node_influence: torch.Tensor  # [n_nodes]
    node_threshold: float
    edge_threshold: float


def prune(graph: AttributionGraph, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> Pruned:
    """Prune by influence on the targets (see the module doc)."""
    for name, value in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}")
    A = _sparse(graph.adjacency)
    w = graph.target_weights().to(A.dtype)
    n, fixed = graph.n_nodes, graph.n_features + graph.n_errors  # tokens and targets are kept
    node_infl = influence(normalize(A), w)
    node_mask = node_infl >= find_threshold(node_infl, node_threshold)
    node_mask[fixed:] = True
    index, values = A.indices(), A.values()
    keep = node_mask[index[0]] & node_mask[index[1]]
    pruned = torch.sparse_coo_tensor(index[:, keep], values[keep], A.shape, check_invariants=False).coalesce()
    N = normalize(pruned)
    edge_infl = influence(N, w) + w
    scores = N.values() * edge_infl[N.indices()[0]]
    edge_keep = scores >= find_threshold(scores, edge_threshold) if scores.numel() else scores.bool()
    rows, cols = N.indices()[0][edge_keep], N.indices()[1][edge_keep]
    while True:
        before = node_mask.clone()
        alive = node_mask[rows] & node_mask[cols]
        rows, cols = rows[alive], cols[alive]
        has_out = torch.zeros(n, dtype=torch.bool)
        has_out[cols] = True
        has_in = torch.zeros(n, dtype=torch.bool)
        has_in[rows] = True
        node_mask[:fixed] &= has_out[:fixed]
        node_mask[:graph.n_features] &= has_in[:graph.n_features]
        if torch.equal(node_mask, before):
            break
    dense_index = torch.stack([rows, cols])
    kept_values = _lookup(pruned, dense_index)
    edges = torch.sparse_coo_tensor(dense_index, kept_values, A.shape, check_invariants=False).coalesce()
    order = node_infl.sort(descending=True)
    cumulative = torch.zeros_like(node_infl)
    cumulative[order.indices] = order.values.cumsum(0) / order.values.sum().clamp_min(1e-300)
    return Pruned(node_mask, edges, cumulative, node_infl, node_threshold, edge_threshold)


def _lookup(A: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The entries of coalesced sparse ``A`` at ``index`` (``[2, k]``, all present in ``A``)."""
    n = A.shape[1]
    keys = A.indices()[0] * n + A.indices()[1]  # sorted: A is coalesced
    wanted = index[0] * n + index[1]
    return A.values()[torch.searchsorted(keys, wanted)]


def scores(graph: AttributionGraph) -> dict[str, float]:
    """``replacement`` and ``completeness`` scores of the unpruned graph (see the module doc)."""
    A = _sparse(graph.adjacency)
    w = graph.target_weights().to(A.dtype)
    N = normalize(A)
    infl = influence(N, w)
    e0, e1 = graph.n_features, graph.n_features + graph.n_errors
    token_infl, error_infl = infl[e1:e1 + graph.n_pos].sum(), infl[e0:e1].sum()
    index, values = N.indices(), N.values()
    from_error = (index[1] >= e0) & (index[1] < e1)
    error_share = torch.zeros(graph.n_nodes, dtype=values.dtype).index_add_(0, index[0][from_error], values[from_error])
    output_infl = infl + w
    return {
        "replacement": float(token_infl / (token_infl + error_infl).clamp_min(1e-300)),
        "completeness": float(((1 - error_share) * output_infl).sum() / output_infl.sum()),
    }
