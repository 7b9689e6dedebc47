"""Concept erasure: LEACE's closed form, and probes that fall to chance on the erased concept only."""

from __future__ import annotations

import pytest
import torch

import crosspatch as cp
from crosspatch.trainable.erasure import (
    Erase, fit_eraser, fit_leace, fit_mean_projection, probe_accuracy, site_activations,
)


def _planted(n=3000, d=16, seed=0):
    """Two independent binary concepts along two directions, in correlated Gaussian noise."""
    g = torch.Generator().manual_seed(seed)
    z1, z2 = torch.randint(0, 2, (n,), generator=g), torch.randint(0, 2, (n,), generator=g)
    u1, u2 = torch.randn(d, generator=g), torch.randn(d, generator=g)
    mix = torch.randn(d, d, generator=g) / d**0.5
    x = torch.randn(n, d, generator=g) @ mix + 3 * z1[:, None] * u1 / u1.norm() + 3 * z2[:, None] * u2 / u2.norm()
    return x.double(), z1, z2


def _mse(P, sigma):
    eye = torch.eye(P.shape[0], dtype=P.dtype)
    return torch.trace((P - eye) @ sigma @ (P - eye).T)


def test_leace_closed_form_guardedness_and_least_squares():
    x, z1, _ = _planted()
    eraser = fit_leace(x, z1)
    xe = eraser(x)
    # linear guardedness: zero cross-covariance with the concept, and the mean is unchanged
    zc = z1.double() - z1.double().mean()
    cross = (xe - xe.mean(0)).T @ zc / (len(x) - 1)
    assert cross.abs().max() < 1e-10
    torch.testing.assert_close(xe.mean(0), x.mean(0))
    assert eraser.rank == 1
    # least squares: any other guarded linear map P' = P + F (I - q q^T) moves x more
    xc = x - x.mean(0)
    sigma = xc.T @ xc / (len(x) - 1)
    q = (xc.T @ zc)
    q = (q / q.norm())[:, None]
    eye = torch.eye(x.shape[1], dtype=torch.float64)
    best = _mse(eraser.P, sigma)
    g = torch.Generator().manual_seed(1)
    for scale in (1e-3, 1e-1, 1.0):
        F = scale * torch.randn(x.shape[1], x.shape[1], generator=g, dtype=torch.float64)
        other = eraser.P + F @ (eye - q @ q.T)
        assert (other @ (xc.T @ zc)).abs().max() < 1e-8  # also guarded
        assert _mse(other, sigma) > best
    # the orthogonal (mean) projection is guarded too, but moves x more
    mean_proj = fit_mean_projection(x, z1)
    assert ((mean_proj(x) - mean_proj(x).mean(0)).T @ zc).abs().max() < 1e-8
    assert _mse(mean_proj.P, sigma) > best


def test_probes_on_planted_concepts():
    x, z1, z2 = _planted()
    tr, te = slice(0, 1500), slice(1500, 3000)
    for method in ("leace", "mean"):
        eraser = fit_leace(x[tr], z1[tr], method=method)
        xe = eraser(x)
        before1 = probe_accuracy(x[tr], z1[tr], x[te], z1[te])
        after1 = probe_accuracy(xe[tr], z1[tr], xe[te], z1[te])
        before2 = probe_accuracy(x[tr], z2[tr], x[te], z2[te])
        after2 = probe_accuracy(xe[tr], z2[tr], xe[te], z2[te])
        assert before1 > 0.95 and before2 > 0.95
        assert abs(after1 - 0.5) < 0.05, (method, after1)
        assert after2 > 0.95, (method, after2)


def test_multiclass_labels_and_rank():
    g = torch.Generator().manual_seed(2)
    z = torch.randint(0, 4, (2000,), generator=g)
    means = 3 * torch.randn(4, 12, generator=g)
    x = torch.randn(2000, 12, generator=g) + means[z]
    eraser = fit_leace(x, z)
    assert eraser.rank == 3  # k - 1 directions for k classes
    assert probe_accuracy(eraser(x[:1000]), z[:1000], eraser(x[1000:]), z[1000:]) < 0.35  # chance is 0.25
    with pytest.raises(ValueError):
        fit_leace(x, torch.zeros(2000, dtype=torch.long))


def test_erase_intervention_on_tiny_gpt2(gpt2):
    """Erase 'token at position 3 < 50' from resid_post.0 through the engine; token parity survives."""
    m = cp.wrap(gpt2)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 100, (1600, 6), generator=g)
    concept, unrelated = (ids[:, 3] < 50).long(), ids[:, 3] % 2
    site = "resid_post.0[pos=3]"
    tr, te = slice(0, 800), slice(800, 1600)
    eraser = fit_eraser(m, ids[tr], site, concept[tr])
    assert isinstance(eraser, Erase) and eraser.eraser.rank == 1
    x = site_activations(m, ids, site)
    xe = site_activations(m, ids, site, interventions={site: eraser})
    assert x.shape == xe.shape == (1600, 64)
    acc = {
        "concept": (probe_accuracy(x[tr], concept[tr], x[te], concept[te]),
                    probe_accuracy(xe[tr], concept[tr], xe[te], concept[te])),
        "unrelated": (probe_accuracy(x[tr], unrelated[tr], x[te], unrelated[te]),
                      probe_accuracy(xe[tr], unrelated[tr], xe[te], unrelated[te])),
    }
    assert acc["concept"][0] > 0.85 and abs(acc["concept"][1] - 0.5) < 0.06, acc
    assert acc["unrelated"][0] > 0.75 and acc["unrelated"][1] > acc["unrelated"][0] - 0.03, acc
    # The engine applies exactly the fitted map, and only at the chosen position.
    manual = eraser.eraser(x[:5])
    torch.testing.assert_close(xe[:5], manual.to(xe.dtype), rtol=1e-5, atol=1e-5)
    full_plain = m.capture(ids[:5], "resid_post.0")["resid_post.0"]
    full_erased = m.run(ids[:5], {site: eraser}, capture="resid_post.0").cache["resid_post.0"]
    assert torch.equal(full_plain[:, :3], full_erased[:, :3]) and torch.equal(full_plain[:, 4:], full_erased[:, 4:])


def test_erase_on_channel_axis_and_errors(toy):
    """On a family whose features are not named 'dim', an explicit axis is used; selections are refused."""
    g = torch.Generator().manual_seed(3)
    xs = torch.randn(400, 2, 4, generator=g)
    labels = (xs[:, :, 0] > 0).long()  # one label per (input, position)
    eraser = fit_eraser(toy, xs, "out", labels.reshape(-1), axis="class")
    assert eraser.eraser.proj_left.shape[0] == 3
    out = toy.run(xs, {"out": eraser}).output
    assert out.shape == (400, 2, 3)
    with pytest.raises(cp.SiteError):
        toy.run(xs, {"out[class=0]": eraser})
    with pytest.raises(ValueError):
        fit_eraser(toy, xs, "hidden.0", torch.zeros(3, dtype=torch.long))
