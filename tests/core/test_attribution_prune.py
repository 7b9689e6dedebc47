"""Influence, pruning and scores on the sparse adjacency agree with the dense closed forms of the reference."""

from __future__ import annotations

import pytest
import torch

import crosspatch as cp
from crosspatch.methods.attribution_graph import attribution_graph
from crosspatch.methods.attribution_graph.prune import influence, normalize, prune, scores
from test_attribution_graph import random_transcoder


@pytest.fixture(scope="module")
def graph():
    from conftest import randomize, tiny_gpt2

    m = cp.wrap(randomize(tiny_gpt2()).double())
    ids = torch.randint(1, 100, (1, 7), generator=torch.Generator().manual_seed(3))
    return attribution_graph(m, random_transcoder(64, 2, cross_layer=True, seed=4), ids, progress=False)


def dense_normalized(A: torch.Tensor) -> torch.Tensor:
    a = A.abs()
    return a / a.sum(1, keepdim=True).clamp_min(1e-10)


def test_node_influence_is_the_closed_form(graph):
    A = graph.dense()
    N = dense_normalized(A)
    w = graph.target_weights()
    closed = w @ (torch.linalg.inv(torch.eye(graph.n_nodes, dtype=torch.float64) - N) - torch.eye(graph.n_nodes))
    mine = influence(normalize(graph.adjacency), w)
    torch.testing.assert_close(mine, closed, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(normalize(graph.adjacency).to_dense(), N, rtol=1e-12, atol=0)
    assert float(mine[: graph.n_features].abs().sum()) > 0


def reference_prune(graph, node_threshold: float, edge_threshold: float):
    """circuit-tracer's prune_graph on dense matrices, written out."""
    A = graph.dense()
    w = graph.target_weights()
    n_fixed = graph.n_pos + len(graph.targets)

    def infl(M):
        return w @ (torch.linalg.inv(torch.eye(len(M), dtype=M.dtype) - M) - torch.eye(len(M), dtype=M.dtype))

    def threshold(s, t):
        s = s.sort(descending=True).values
        c = s.cumsum(0) / s.sum()
        return s[min(int(torch.searchsorted(c, torch.tensor(t, dtype=c.dtype))), len(s) - 1)]

    node_infl = infl(dense_normalized(A))
    node_mask = node_infl >= threshold(node_infl, node_threshold)
    node_mask[-n_fixed:] = True
    P = A.clone()
    P[~node_mask] = 0
    P[:, ~node_mask] = 0
    N = dense_normalized(P)
    edge_scores = N * (infl(N) + w)[:, None]
    nz = edge_scores[edge_scores > 0]
    edge_mask = (edge_scores >= threshold(nz, edge_threshold)) & (edge_scores > 0)
    old = None
    while old is None or not torch.equal(old, node_mask):
        old = node_mask.clone()
        edge_mask[~node_mask] = False
        edge_mask[:, ~node_mask] = False
        node_mask[:-n_fixed] &= edge_mask[:, :-n_fixed].any(0)
        node_mask[: graph.n_features] &= edge_mask[: graph.n_features].any(1)
    edge_mask[~node_mask] = False
    edge_mask[:, ~node_mask] = False
    return node_mask, edge_mask


@pytest.mark.parametrize("thresholds", [(0.8, 0.98), (0.5, 0.9), (1.0, 1.0)])
def test_pruning_matches_the_reference_on_dense_matrices(graph, thresholds):
    pruned = prune(graph, *thresholds)
    node_mask, edge_mask = reference_prune(graph, *thresholds)
    assert torch.equal(pruned.node_mask, node_mask)
    kept = pruned.edges.to_dense()
    assert torch.equal(kept != 0, edge_mask)
    torch.testing.assert_close(kept[edge_mask], graph.dense()[edge_mask], rtol=0, atol=0)
    if thresholds == (0.8, 0.98):
        assert 0 < int(pruned.node_mask[: graph.n_features].sum()) < graph.n_features  # it prunes something


def test_scores_are_the_reference_formulas(graph):
    A = graph.dense()
    N = dense_normalized(A)
    w = graph.target_weights()
    infl = w @ (torch.linalg.inv(torch.eye(len(N), dtype=N.dtype) - N) - torch.eye(len(N), dtype=N.dtype))
    e0, e1 = graph.n_features, graph.n_features + graph.n_errors
    tok, err = infl[e1:e1 + graph.n_pos].sum(), infl[e0:e1].sum()
    out = infl + w
    expected = {"replacement": float(tok / (tok + err)),
                "completeness": float(((1 - N[:, e0:e1].sum(1)) * out).sum() / out.sum())}
    got = scores(graph)
    assert got == pytest.approx(expected, rel=1e-9)
    assert 0 < got["replacement"] < 1 and 0 < got["completeness"] < 1


def test_thresholds_out_of_range_are_refused(graph):
    with pytest.raises(ValueError, match="node_threshold must be in"):
        prune(graph, 1.5)
