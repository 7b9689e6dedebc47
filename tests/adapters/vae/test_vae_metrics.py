"""Latent traversals and the VAE metrics against closed forms on hand-built linear decoders."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import crosspatch as cp
from crosspatch.adapters.vae import ConvVAE
from crosspatch.engine.interventions import Set
from crosspatch.methods.latent import decode, decoder_inputs, encode, latent_traversal, traversal_figure, traversal_grid
from crosspatch.methods.vae_metrics import (
    causal_effect_strength, circuit_modularity, effect_maps, factor_mediation, intervention_specificity, latent_metrics,
)
from crosspatch.zoo.tasks import ShapesTask
from vae_helpers import LinearVAE, images, tiny_kl

close = torch.testing.assert_close
D = torch.float64

# Output [2 channels, 1, 3]: six elements. Column 3 is a dead latent.
W = torch.tensor([
    [1.0, 0.0, 0.5, 0.0],
    [2.0, 0.0, 0.5, 0.0],
    [0.0, 0.0, 0.5, 0.0],
    [-1.0, 3.0, 0.5, 0.0],
    [0.0, 0.0, 0.5, 0.0],
    [0.5, 0.0, 0.5, 0.0],
], dtype=D)
VALUES = (-2.0, -1.0, 0.5, 3.0)


@pytest.fixture(scope="module")
def linear():
    return cp.wrap(LinearVAE(W, torch.linspace(-1, 1, 6, dtype=D), shape=(2, 1, 3)))


def zeros(n=2):
    return {"latents": torch.zeros(n, 4, dtype=D)}


def entropy_specificity(e: np.ndarray) -> float:
    q = e / e.sum()
    q = q[q > 0]
    return 1 - float(-(q * np.log(q)).sum()) / math.log(e.size)


def test_effect_strength_closed_form(linear):
    a = np.abs(W.numpy())
    v = np.array(VALUES)
    ces = causal_effect_strength(linear, zeros(), values=VALUES)
    assert ces.dims == ("latent",) and ces.coords["latent"] == [0, 1, 2, 3]
    np.testing.assert_allclose(ces.values, a.mean(axis=0) * np.abs(v).mean(), rtol=1e-12)
    sq = causal_effect_strength(linear, zeros(), values=VALUES, distance="sq")
    np.testing.assert_allclose(sq.values, (W.numpy() ** 2).mean(axis=0) * (v**2).mean(), rtol=1e-12)
    # a shift does not depend on where the latents are
    z = {"latents": torch.randn(3, 4, dtype=D, generator=torch.Generator().manual_seed(0))}
    shift = causal_effect_strength(linear, z, values=VALUES, intervention="add")
    np.testing.assert_allclose(shift.values, ces.values, rtol=1e-12)
    # against the grid's mean output: |v - mean v|
    spread = causal_effect_strength(linear, z, values=VALUES, baseline="grid_mean")
    np.testing.assert_allclose(spread.values, a.mean(axis=0) * np.abs(v - v.mean()).mean(), rtol=1e-12)
    normed = causal_effect_strength(linear, zeros(), values=VALUES, normalize="sum")
    np.testing.assert_allclose(normed.values, a.mean(axis=0) / a.mean(axis=0).sum(), rtol=1e-12)
    assert normed.metadata["normalize"] == "sum" and normed.metadata["values"] == list(VALUES)


def test_specificity_closed_form(linear):
    a = np.abs(W.numpy())
    spec = intervention_specificity(linear, zeros(), values=VALUES)
    want = [entropy_specificity(a[:, i]) for i in range(3)]
    np.testing.assert_allclose(spec.values[:3], want, rtol=1e-12)
    assert spec.values[1] == pytest.approx(1.0)  # latent 1 moves one element
    assert spec.values[2] == pytest.approx(0.0, abs=1e-12)  # latent 2 moves all six equally
    assert math.isnan(spec.values[3])  # no effect: undefined
    gini = intervention_specificity(linear, zeros(), values=VALUES, measure="gini")
    for i in range(3):
        e = a[:, i]
        pairwise = np.abs(e[:, None] - e[None, :]).sum() / (2 * e.size * e.sum()) * e.size / (e.size - 1)
        assert gini.values[i] == pytest.approx(pairwise, rel=1e-12)
    pixels = intervention_specificity(linear, zeros(), values=VALUES, over="pixels")
    per_pixel = a.reshape(2, 3, 4).sum(axis=0)
    np.testing.assert_allclose(pixels.values[:3], [entropy_specificity(per_pixel[:, i]) for i in range(3)], rtol=1e-12)


def test_modularity_closed_form(linear):
    a = np.abs(W.numpy())
    mod = circuit_modularity(linear, zeros(), values=VALUES)
    assert mod.dims == () and mod.metadata["active_units"] == [0, 1, 2]  # the dead latent is left out
    corr = np.corrcoef(a[:, :2].T)
    # latent 2's map is constant: its correlations count as 0
    pairs = [abs(corr[0, 1]), 0.0, 0.0]
    assert float(mod.values) == pytest.approx(1 - np.mean(pairs), rel=1e-12)
    cos = circuit_modularity(linear, zeros(), values=VALUES, similarity="cosine")
    unit = a[:, :3] / np.linalg.norm(a[:, :3], axis=0)
    cosines = unit.T @ unit
    assert float(cos.values) == pytest.approx(1 - np.mean([cosines[0, 1], cosines[0, 2], cosines[1, 2]]), rel=1e-12)
    # disjoint one-element effects: Pearson sees |corr| = 1 / (P - 1), the cosine sees 0
    disjoint = cp.wrap(LinearVAE(torch.eye(4, dtype=D)))
    assert float(circuit_modularity(disjoint, zeros(), values=VALUES).values) == pytest.approx(1 - 1 / 3)
    assert float(circuit_modularity(disjoint, zeros(), values=VALUES, similarity="cosine").values) == pytest.approx(1.0)
    # proportional maps: not modular at all
    same = cp.wrap(LinearVAE(torch.tensor([[1.0, 2.0], [2.0, 4.0], [0.0, 0.0]], dtype=D)))
    assert float(circuit_modularity(same, {"latents": torch.zeros(1, 2, dtype=D)}).values) == pytest.approx(0.0, abs=1e-12)


def test_metrics_share_one_set_of_maps(linear):
    out = latent_metrics(linear, zeros(), values=VALUES, normalize="max")
    assert set(out) == {"maps", "effect_strength", "specificity", "modularity"}
    assert out["maps"].maps.shape == (4, 2, 1, 3)
    np.testing.assert_allclose(out["effect_strength"].values.max(), 1.0)
    again = causal_effect_strength(out["maps"])
    assert again.values.shape == (4,)
    with pytest.raises(TypeError):
        causal_effect_strength(out["maps"], zeros())
    res = out["maps"].to_result()
    assert res.dims == ("latent", "channel", "h", "w")


# ------------------------------------------------------------------ traversals


def test_traversal_is_batched_and_matches_single_runs():
    torch.manual_seed(0)
    model = ConvVAE(latent_dim=5).eval()
    m = cp.wrap(model)
    x = images(n=2, size=32)
    values = [-1.5, 0.0, 2.0]
    frames = latent_traversal(m, x, "latent.z[dim=2]", values)
    assert frames.shape == (3, 2, 3, 32, 32)
    for j, v in enumerate(values):
        close(frames[j], m.run(x, {"latent.z[dim=2]": Set(v)}).output)
    z = encode(m, x)
    close(latent_traversal(m, decoder_inputs(m, x), "latent.z[dim=2]", values), frames)
    edited = z.clone()
    edited[:, 2] = 2.0
    close(decode(m, edited), frames[2])
    grid = traversal_grid(m, x[:1], values=values, batch_size=4)  # several forwards
    assert grid.shape == (5, 3, 1, 3, 32, 32)
    close(grid[2, :, 0], frames[:, 0])
    fig = traversal_figure(grid[:, :, 0], row_labels=[f"z{i}" for i in range(5)], col_labels=values, title="t")
    assert len(fig.axes) == 15


def test_spatial_latents_of_autoencoder_kl():
    m = cp.wrap(tiny_kl())
    x = images(n=2)
    maps = effect_maps(m, x, values=(-1.0, 1.0))
    assert maps.maps.shape == (3, 3, 16, 16) and maps.labels == [0, 1, 2]
    grid = traversal_grid(m, x, "latent.z", values=(-1.0, 1.0))
    assert grid.shape == (3, 2, 2, 3, 16, 16)


# ------------------------------------------------------------------ factor mediation


def test_mediation_finds_the_factor_of_each_latent():
    # latent perm[k] encodes factor k; the decoder mixes all latents into every output element
    perm = [2, 0, 3, 1]
    enc = torch.zeros(4, 4, dtype=D)
    for factor, latent in enumerate(perm):
        enc[latent, factor] = 1.0
    dec = torch.randn(12, 4, dtype=D, generator=torch.Generator().manual_seed(0))
    model = cp.wrap(LinearVAE(dec, encoder=enc))
    gen = torch.Generator().manual_seed(1)
    pairs = {}
    for k in range(4):
        clean = torch.randn(8, 4, dtype=D, generator=gen)
        corrupt = clean.clone()
        corrupt[:, k] += 1 + torch.rand(8, dtype=D, generator=gen)
        pairs[f"f{k}"] = (clean, corrupt)
    for measure in ("projection", "distance"):
        res = factor_mediation(model, pairs, measure=measure)
        assert res.dims == ("factor", "latent") and res.coords["factor"] == ["f0", "f1", "f2", "f3"]
        want = np.zeros((4, 4))
        want[range(4), perm] = 1.0
        np.testing.assert_allclose(res.values, want, atol=1e-12)


def test_mediation_on_shapes_latents_and_encoder_channels(tmp_path):
    torch.manual_seed(0)
    m = cp.wrap(ConvVAE(latent_dim=4).eval())
    task = ShapesTask()
    res = factor_mediation(m, task, n=4, factors=["colour", "x"])
    assert res.dims == ("factor", "latent") and res.values.shape == (2, 4)
    assert np.isfinite(res.values).all()
    assert set(res.metadata["total_effect"]) == {"colour", "x"}
    channels = factor_mediation(m, task, "encoder.block.2", n=2, factors=["shape"])
    assert channels.dims == ("factor", "channel") and channels.values.shape == (1, 32)
    # all latents together carry the whole change (z decides the reconstruction)
    pairs = task.pairs(4, factor="colour", split="train")
    dims = "{0,1,2,3}"
    full = factor_mediation(m, {"colour": pairs}, f"latent.z[dim={dims}]")
    assert full.values.shape == (1, 1) and full.values[0, 0] == pytest.approx(1.0)
    res.plot().savefig(tmp_path / "mediation.png")
    assert cp.Result.load(res.save(tmp_path / "mediation")) == res
