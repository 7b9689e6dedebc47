"""Learned edge masks on tiny GPT-2: the differentiable masked forward and recovery of known edges."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import crosspatch as cp
from crosspatch.results.metrics import MetricContext
from crosspatch.methods.circuit_eval import roc
from crosspatch.methods.edge_masks import ablated_senders, learn_edge_masks, masked_edges_output
from crosspatch.methods.edges import EdgePatcher, eap, edge_graph, patch_edges
from test_edges import _model, _pair, _sparse_model, _truth


@pytest.fixture(scope="module")
def m():
    return _model()


def _strong_sparse_model(factor: float = 8.0):
    """test_edges' sparse model (only heads 0.1 and 1.2 write) with the live heads' q/k/v and output
    weights scaled up, so that every true edge moves the KL by more than 1e-8 (in the plain one some move it by 1e-16)."""
    m = _sparse_model()
    with torch.no_grad():
        for layer, live in ((0, 1), (1, 2)):
            block = m.module.transformer.h[layer]
            for q in range(3):
                block.attn.c_attn.weight[:, q * 64 + live * 16 : q * 64 + (live + 1) * 16] *= factor
            block.attn.c_proj.weight[live * 16 : (live + 1) * 16] *= factor
    return m


@pytest.mark.parametrize("ablation", ["resample", "zero", "mean"])
def test_masked_forward_is_patch_edges(m, ablation):
    clean, corrupt = _pair()
    g = edge_graph(m)
    masks = torch.bernoulli(torch.full((3, len(g)), 0.3), generator=torch.Generator().manual_seed(0))
    p = EdgePatcher(m, clean, corrupt, ablation, None, g)
    want = patch_edges(m, clean, corrupt, masks, ablation=ablation, graph=g)
    torch.testing.assert_close(masked_edges_output(p, masks, grad=False), want, atol=1e-5, rtol=1e-5)


def test_mask_gradient_at_zero_is_eap(m):
    """d metric / d patch-weight at no patch is EAP's score, edge by edge."""
    clean, corrupt = _pair()
    g = edge_graph(m)
    metric = cp.metrics.logit_diff(clean[:, -1], (clean[:, -1] + 1) % 100)
    p = EdgePatcher(m, clean, corrupt, "resample", None, g)
    p.ablated = {k: v.clone() for k, v in p.ablated.items()}
    w = torch.zeros(1, len(g), requires_grad=True)
    out = masked_edges_output(p, w)
    metric(out, MetricContext(torch.arange(p.n))).mean().backward()
    np.testing.assert_allclose(w.grad[0].numpy(), eap(m, clean, corrupt, metric, graph=g).values, atol=2e-5, rtol=1e-3)


def test_learned_masks_keep_the_true_edges():
    m = _strong_sparse_model()
    clean, corrupt = _pair()
    g = edge_graph(m)
    truth = _truth(g)
    res = learn_edge_masks(m, clean, corrupt, graph=g, steps=150, sparsity=0.05, seed=0)
    assert roc(res, truth).metadata["auc"] >= 0.95
    assert set(res.metadata["kept"]) == truth
    assert res.metadata["final_metric"] < 1e-6
    assert res.metadata["history"][-1] < res.metadata["history"][0]


def test_learned_masks_on_the_plain_sparse_model_keep_only_true_edges():
    m = _sparse_model()
    clean, corrupt = _pair()
    g = edge_graph(m)
    truth = _truth(g)
    res = learn_edge_masks(m, clean, corrupt, graph=g, steps=100, sparsity=0.05)
    kept = set(res.metadata["kept"])
    assert "embed->logits_in" in kept and kept <= truth


def test_mean_per_position_is_edges_mean(m):
    clean, _ = _pair()
    g = edge_graph(m)
    p = EdgePatcher(m, clean, None, "mean", None, g)
    cache = m.capture(clean, p.keys)
    per_pos = ablated_senders(cache, p.keys, "mean_per_position")
    for k in p.keys:
        torch.testing.assert_close(per_pos[k], p.ablated[k])
    over = ablated_senders(cache, p.keys, "mean_over_positions")
    torch.testing.assert_close(over["embed"][0, 0], cache["embed"].mean(dim=(0, 1)))
    assert over["embed"].shape == per_pos["embed"].shape
