"""EAP's edge scores against an oracle that shares none of its code paths: the derivative of exactly patched
edges (``patch_edges``, forward only) with respect to each edge's mask value, by central differences in
float64 on a tiny GPT-2 and Llama. EAP's score of an edge is that derivative at the clean run, averaged over
prompts. Checked for pairs that differ from the first position on (no shared prefix) and in the middle only
(the corrupt run resumed), under resample, zero and mean ablation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import crosspatch as cp
from conftest import randomize, tiny_gpt2, tiny_llama
from crosspatch.methods.edges import EdgePatcher, eap, eap_ig, edge_graph

MODELS = {"gpt2": lambda: randomize(tiny_gpt2(initializer_range=0.2)),  # large effects, far from float error
          "llama": lambda: randomize(tiny_llama(initializer_range=0.2))}


def _pair(first: bool):
    torch.manual_seed(5)
    clean = torch.randint(2, 100, (3, 7))
    corrupt = clean.clone()
    corrupt[:, 3] = (clean[:, 3] + 17) % 98 + 2
    if first:
        corrupt[:, 0] = (clean[:, 0] + 5) % 98 + 2
    return clean, corrupt


def _logit_diff(out: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """Per row of ``out`` (``[k * n, pos, vocab]``): the logit difference at the last position."""
    n = clean.shape[0]
    answer, distractor = clean[:, -1].repeat(out.shape[0] // n), ((clean[:, -1] + 1) % 100).repeat(out.shape[0] // n)
    rows = torch.arange(out.shape[0])
    return out[rows, -1, answer] - out[rows, -1, distractor]


def _finite_difference_scores(m, clean, corrupt, ablation: str, eps: float = 1e-4, chunk: int = 64) -> np.ndarray:
    """Per edge, ``d mean_prompts(metric) / d mask_e`` at mask 0 by central differences of exact edge patching."""
    p = EdgePatcher(m, clean, corrupt, ablation, None, None)
    n_edges, n = len(p.graph), clean.shape[0]
    out = np.empty(n_edges)
    for e0 in range(0, n_edges, chunk):
        e1 = min(n_edges, e0 + chunk)
        eye = torch.zeros(e1 - e0, n_edges, dtype=torch.float64)
        eye[torch.arange(e1 - e0), torch.arange(e0, e1)] = eps
        with torch.no_grad():
            plus = _logit_diff(p.run(eye), clean).view(-1, n).mean(1)
            minus = _logit_diff(p.run(-eye), clean).view(-1, n).mean(1)
        out[e0:e1] = ((plus - minus) / (2 * eps)).numpy()
    return out


@pytest.mark.parametrize("arch", sorted(MODELS))
@pytest.mark.parametrize("ablation,first", [("resample", True), ("resample", False), ("zero", False), ("mean", True)])
def test_eap_scores_equal_the_derivative_of_exact_edge_patching(arch, ablation, first):
    m = cp.wrap(MODELS[arch]().double())
    clean, corrupt = _pair(first)
    metric = cp.metrics.logit_diff(clean[:, -1], (clean[:, -1] + 1) % 100)
    got = eap(m, clean, corrupt, metric, ablation=ablation)
    # Llama's RMSNorm computes in float32 even in a float64 model: a wider step keeps its rounding (~1e-7 of the
    # metric) small against the step, at a truncation error of order step^2.
    eps, rtol, atol = (1e-4, 1e-5, 1e-7) if arch == "gpt2" else (1e-2, 2e-3, 1e-4)
    want = _finite_difference_scores(m, clean, corrupt, ablation, eps)
    assert np.abs(want).max() > 1e-2
    np.testing.assert_allclose(got.values, want, rtol=rtol, atol=atol * np.abs(want).max())
    assert got.metadata["shared_positions"] == (0 if first or ablation != "resample" else 3)
    np.testing.assert_allclose(eap_ig(m, clean, corrupt, metric, steps=1, ablation=ablation).values, got.values,
                               rtol=1e-9, atol=1e-12 * np.abs(want).max())


def test_a_metric_read_before_the_first_difference_gives_zero_scores():
    """Read at position 2 of a pair that first differs at 3, every edge's effect is 0 (exact edge patching
    moves nothing there): EAP, whose last block is read at the metric's position alone, gives exact zeros."""
    m = cp.wrap(MODELS["gpt2"]().double())
    clean, corrupt = _pair(False)
    metric = cp.metrics.logit_diff(clean[:, 2], (clean[:, 2] + 1) % 100, pos=2)
    got = eap(m, clean, corrupt, metric)
    assert got.metadata["shared_positions"] == 3
    assert np.all(got.values == 0)
    p = EdgePatcher(m, clean, corrupt, "resample", None, None)
    with torch.no_grad():
        moved = p.run(torch.ones(1, len(p.graph), dtype=torch.float64)) - p.run(torch.zeros(1, len(p.graph)))
    assert torch.all(moved[:, 2] == 0)
