"""Steering: difference-of-means vectors and batched effect curves, on the toy adapter and tiny GPT-2."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import crosspatch as cp
from crosspatch.methods.steering import plot_curve, steering_curve, steering_vector


def _class_mean(c):
    return lambda out: out[:, :, c].mean(dim=1)


def test_vector_is_difference_of_means(toy):
    torch.manual_seed(0)
    pos_x, neg_x = torch.randn(6, 5, 4), torch.randn(8, 3, 4)  # different batch sizes and lengths
    v = steering_vector(toy, pos_x, neg_x, "hidden.0")
    a = toy.capture(pos_x, "hidden.0")["hidden.0"].double().mean(dim=(0, 1))
    b = toy.capture(neg_x, "hidden.0")["hidden.0"].double().mean(dim=(0, 1))
    assert v.shape == (4,)
    torch.testing.assert_close(v.double(), a - b, rtol=1e-6, atol=1e-6)
    # A position selection averages over those positions only.
    v_last = steering_vector(toy, pos_x, neg_x, "hidden.0[pos=-1]")
    a_last = toy.capture(pos_x, "hidden.0")["hidden.0"][:, -1].double().mean(0)
    b_last = toy.capture(neg_x, "hidden.0")["hidden.0"][:, -1].double().mean(0)
    torch.testing.assert_close(v_last.double(), a_last - b_last, rtol=1e-6, atol=1e-6)
    with pytest.raises(cp.SiteError):
        steering_vector(toy, pos_x, neg_x, "hidden.*")


def test_known_direction_gives_exact_line(toy):
    """Adding alpha * e_c to the output moves class c's mean logit by exactly alpha."""
    torch.manual_seed(1)
    x = torch.randn(4, 3, 4)
    alphas = [-2.0, -1.0, 0.0, 0.5, 1.0, 3.0]
    e = torch.tensor([0.0, 1.0, 0.0])
    res = steering_curve(toy, x, "out", alphas, _class_mean(1), vector=e)
    assert res.dims == ("alpha",) and res.coords["alpha"] == alphas
    np.testing.assert_allclose(res.values, alphas, atol=1e-5)
    # class 0 does not move
    res0 = steering_curve(toy, x, "out", alphas, _class_mean(0), vector=e)
    np.testing.assert_allclose(res0.values, 0.0, atol=1e-6)


def test_contrast_vector_recovers_planted_shift(toy):
    """Positive inputs are negative inputs shifted; at the (linear) output the curve's slope is the mean shift."""
    torch.manual_seed(2)
    neg = torch.randn(16, 3, 4)
    pos = neg.clone()
    pos[..., 0] += 2.0
    x = torch.randn(4, 3, 4)
    res = steering_curve(toy, x, "out", [-1.0, 0.0, 1.0, 2.0], _class_mean(2), contrast=(pos, neg))
    v = steering_vector(toy, pos, neg, "out")
    slope = np.polyfit(res.coords["alpha"], res.values, 1)[0]
    assert slope == pytest.approx(float(v[2]), rel=1e-4, abs=1e-5)
    assert res.metadata["vector_source"] == "contrast"


def test_alpha_zero_is_no_intervention_exactly(toy, gpt2, ids):
    torch.manual_seed(3)
    x = torch.randn(3, 5, 4)
    plain = toy.run(x).output
    steered = toy.run(x, {"hidden.0": cp.Add(torch.randn(4), 0.0)}).output
    assert torch.equal(plain, steered)
    m = cp.wrap(gpt2)
    v = torch.randn(64)
    assert torch.equal(m.run(ids).output, m.run(ids, {"resid_post.0[pos=-1]": cp.Add(v, 0.0)}).output)
    res = steering_curve(m, ids, "resid_post.0[pos=-1]", [0.0, 1.0], cp.metrics.logit_diff(5, 7), vector=v)
    assert abs(res.values[0]) < 1e-5


def test_batched_equals_one_at_a_time_gpt2(gpt2, ids):
    m = cp.wrap(gpt2)
    torch.manual_seed(4)
    pos = torch.randint(2, 100, (6, 10))
    neg = pos.clone()
    pos[:, -1], neg[:, -1] = 5, 7
    alphas = [-4.0, -2.0, 0.0, 2.0, 4.0]
    metric = cp.metrics.logit_diff(5, 7)
    kwargs = dict(contrast=(pos, neg))
    batched = steering_curve(m, ids, "resid_post.*[pos=-1]", alphas, metric, batch_size=1000, **kwargs)
    single = steering_curve(m, ids, "resid_post.*[pos=-1]", alphas, metric, batch_size=1, **kwargs)
    assert batched.dims == ("site", "alpha") and batched.values.shape == (2, 5)
    np.testing.assert_allclose(batched.values, single.values, atol=1e-5)
    # and each curve equals running Add by hand, one alpha at a time
    v = steering_vector(m, pos, neg, "resid_post.1[pos=-1]")
    base = metric(m.run(ids).output).double().mean()
    by_hand = [float(metric(m.run(ids, {"resid_post.1[pos=-1]": cp.Add(v, a)}).output).double().mean() - base)
               for a in alphas]
    np.testing.assert_allclose(batched.values[1], by_hand, atol=1e-5)


def test_unembedding_direction_is_monotone_gpt2(gpt2, ids):
    """Steering the last residual along W_U[a] - W_U[b] raises logit(a) - logit(b) monotonically."""
    m = cp.wrap(gpt2)
    W = gpt2.lm_head.weight.detach()
    v = W[5] - W[7]
    alphas = np.linspace(-3, 3, 7).tolist()
    res = steering_curve(m, ids, "resid_post.1[pos=-1]", alphas, cp.metrics.logit_diff(5, 7), vector=v)
    assert np.all(np.diff(res.values) > 0)
    assert res.values[alphas.index(0.0)] == pytest.approx(0.0, abs=1e-5)


def test_plot_save_and_errors(toy, tmp_path):
    x = torch.randn(2, 3, 4)
    res = steering_curve(toy, x, ["hidden.0", "hidden.1"], [-1.0, 0.0, 1.0], _class_mean(0),
                         vector={"hidden.0": torch.ones(4), "hidden.1": -torch.ones(4)})
    assert res.dims == ("site", "alpha")
    plot_curve(res).savefig(tmp_path / "c.png")
    plot_curve(res.sel(site="hidden.0")).savefig(tmp_path / "d.png")
    assert (tmp_path / "c.png").stat().st_size > 0
    assert cp.Result.load(res.save(tmp_path / "r")) == res
    with pytest.raises(ValueError):
        steering_curve(toy, x, "hidden.0", [1.0], _class_mean(0))
    with pytest.raises(KeyError):
        steering_curve(toy, x, ["hidden.0", "hidden.1"], [1.0], _class_mean(0), vector={"hidden.0": torch.ones(4)})
