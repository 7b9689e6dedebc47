"""Attribution patching (AtP, AtP* GradDrop) against exact activation patching: oracles and invariants."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import crosspatch as cp
from conftest import ToyNet, tiny_gpt2, toy_adapter
from crosspatch.methods.attribution import attribution_patching, compare


def _metric(clean):
    answer = clean[:, -1]
    return cp.metrics.logit_diff(answer, (answer + 1) % 100)


class LinearToy(ToyNet):
    """The toy's layers without the ReLUs: every site enters the output linearly."""

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def _toy_pair():
    gen = torch.Generator().manual_seed(5)
    clean = torch.randn(3, 5, 4, generator=gen)
    return clean, clean + torch.randn(3, 5, 4, generator=gen)


@pytest.mark.parametrize("direction", ["denoising", "noising"])
def test_exact_where_the_metric_is_linear_in_the_site(gpt2, pair, direction):
    """logit_diff is linear in the logits, so the first-order estimate is the exact patching effect."""
    clean, corrupt = pair
    metric = _metric(clean)
    atp = attribution_patching(gpt2, clean, corrupt, "logits[pos=*]", metric, direction=direction)
    exact = cp.activation_patching(gpt2, clean, corrupt, "logits[pos=*]", metric, direction=direction)
    assert atp.dims == exact.dims == ("pos",) and atp.coords == exact.coords
    np.testing.assert_allclose(atp.values, exact.values, atol=1e-5)
    assert np.abs(exact.values[-1]) > 1e-3 and np.all(exact.values[:-1] == 0)


@pytest.mark.parametrize("sites", ["hidden.*[pos=*]", "hidden_in.*[dim=*]", "out[pos=*,class=*]"])
@pytest.mark.parametrize("direction", ["denoising", "noising"])
def test_exact_on_a_linear_model_for_every_site(sites, direction):
    m = cp.wrap(LinearToy().eval(), toy_adapter())
    clean, corrupt = _toy_pair()
    metric = lambda out: out[:, -1, 0] - 2 * out[:, 2, 1]  # noqa: E731
    atp = attribution_patching(m, {"x": clean}, {"x": corrupt}, sites, metric, direction=direction)
    exact = cp.activation_patching(m, {"x": clean}, {"x": corrupt}, sites, metric, direction=direction)
    assert atp.dims == exact.dims and atp.coords == exact.coords
    np.testing.assert_allclose(atp.values, exact.values, atol=1e-5)


def test_nonlinear_toy_is_exact_only_at_the_linear_readout():
    m = cp.wrap(ToyNet().eval(), toy_adapter())
    clean, corrupt = _toy_pair()
    metric = lambda out: out[:, -1, 0]  # noqa: E731
    atp = attribution_patching(m, clean, corrupt, "out", metric)
    exact = cp.activation_patching(m, clean, corrupt, "out", metric)
    np.testing.assert_allclose(atp.values, exact.values, atol=1e-6)


def test_rank_correlation_with_patching_over_heads(gpt2, pair):
    clean, corrupt = pair
    metric = _metric(clean)
    for direction in ("denoising", "noising"):
        atp = attribution_patching(gpt2, clean, corrupt, "head_out.*[head=*]", metric, direction=direction)
        exact = cp.activation_patching(gpt2, clean, corrupt, "head_out.*[head=*]", metric, direction=direction)
        stats = compare(atp, exact, k=3)
        assert stats["n_sites"] == 8 and stats["spearman"] > 0.9, stats
        assert stats["top3_overlap"] >= 2 / 3 and stats["sign_agreement"] >= 0.75


def test_top_site_agrees_on_a_constructed_dominant_head(pair):
    model = tiny_gpt2()
    with torch.no_grad():  # head 2 of layer 1 writes 40x louder: it dominates the effect
        model.transformer.h[1].attn.c_proj.weight[32:48] *= 40
    clean, corrupt = pair
    metric = _metric(clean)
    atp = attribution_patching(model, clean, corrupt, "head_out.*[head=*]", metric)
    exact = cp.activation_patching(model, clean, corrupt, "head_out.*[head=*]", metric)
    stats = compare(atp, exact)
    assert stats["top1_agree"]
    assert np.unravel_index(np.abs(exact.values).argmax(), exact.values.shape) == (1, 2)


@pytest.mark.parametrize("grad_drop", [False, True])
def test_costs_two_forwards_and_one_backward(gpt2, pair, monkeypatch, grad_drop):
    clean, corrupt = pair
    forwards = []
    handle = gpt2.register_forward_hook(lambda module, args, output: forwards.append(args))
    backwards = []
    real_grad = torch.autograd.grad

    def counting_grad(*args, **kwargs):
        backwards.append(1)
        return real_grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", counting_grad)
    try:
        sites = ["head_out.*[head=*]", "resid_pre.*[pos=*]", "mlp_out.*", "attn_pattern.*[head=*]"]
        result = attribution_patching(gpt2, clean, corrupt, sites, _metric(clean), grad_drop=grad_drop)
    finally:
        handle.remove()
    assert len(forwards) == 2 and len(backwards) == 1
    assert result.dims == ("site",) and len(result.coords["site"]) == 8 + 18 + 2 + 8
    assert not gpt2._forward_hooks and all(not mod._forward_hooks and not mod._forward_pre_hooks for mod in gpt2.modules())


def _unfactored(model) -> cp.WrappedModel:
    """``model`` wrapped with ``head_out`` stripped of its ``linear_from``: AtP taps the per-head writes."""
    m = cp.wrap(model)
    fam = m.catalog.family("head_out")
    m.catalog.families["head_out"] = dataclasses.replace(fam, linear_from=None)
    return m


@pytest.mark.parametrize("grad_drop", [False, True])
@pytest.mark.parametrize("sites", ["head_out.*[head=*]", "head_out.1[pos=*,head={0,2}]", "head_out.0[pos=-1]"])
def test_head_out_read_through_head_z_equals_the_per_head_writes(gpt2, pair, sites, grad_drop):
    """(w' - w) . dm/dw over d_model equals (z' - z) . dm/dz over d_head: the two paths must agree."""
    clean, corrupt = pair
    metric = _metric(clean)
    fast = attribution_patching(gpt2, clean, corrupt, sites, metric, grad_drop=grad_drop)
    slow = attribution_patching(_unfactored(gpt2), clean, corrupt, sites, metric, grad_drop=grad_drop)
    assert fast.coords == slow.coords and np.abs(slow.values).max() > 1e-4
    np.testing.assert_allclose(fast.values, slow.values, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(fast.metadata["atp"], slow.metadata["atp"], rtol=1e-4, atol=1e-6)


def test_head_out_selecting_model_dims_taps_the_writes(gpt2, pair, monkeypatch):
    """A site that selects along ``dim`` cannot be read through head_z; it taps head_out itself."""
    import crosspatch.methods.attribution as attribution

    clean, corrupt = pair
    captured = []
    real = attribution.execute

    def recording(*args, **kwargs):
        captured.append(list(kwargs.get("capture", ())))
        return real(*args, **kwargs)

    monkeypatch.setattr(attribution, "execute", recording)
    sites = ["head_out.1[head=2,dim=0:8]", "head_out.0[head=1]"]
    result = attribution_patching(gpt2, clean, corrupt, sites, _metric(clean))
    assert captured[0] == ["head_out.1", "head_z.0"]
    monkeypatch.setattr(attribution, "execute", real)
    slow = attribution_patching(_unfactored(gpt2), clean, corrupt, sites, _metric(clean))
    np.testing.assert_allclose(result.values, slow.values, rtol=1e-4, atol=1e-6)


def test_graddrop_invariants(gpt2, pair):
    clean, corrupt = pair
    metric = _metric(clean)
    atp = attribution_patching(gpt2, clean, corrupt, "head_out.*[head=*]", metric)
    gd = attribution_patching(gpt2, clean, corrupt, "head_out.*[head=*]", metric, grad_drop=True)
    assert gd.metadata["variant"] == "atp*_graddrop" and gd.metadata["grad_drop_groups"][1] == ["attn_out.1", "mlp_out.1"]
    np.testing.assert_allclose(gd.metadata["atp"], atp.values.reshape(-1))
    # Last-layer writes: dropping layer 0 changes nothing downstream, dropping their own layer zeroes them.
    np.testing.assert_allclose(gd.values[1], atp.values[1], rtol=1e-5, atol=1e-9)
    assert not np.allclose(gd.values[0], atp.values[0])
    # One empty group drops nothing: GradDrop is plain AtP.
    same = attribution_patching(gpt2, clean, corrupt, "head_out.*[head=*]", metric, grad_drop=True, grad_drop_groups=[[]])
    np.testing.assert_allclose(same.values, atp.values, rtol=1e-6)


def test_frozen_parameters_and_identical_inputs(pair):
    model = tiny_gpt2().requires_grad_(False)
    clean, _ = pair
    result = attribution_patching(model, clean, clean, "resid_pre.*[pos=*]", _metric(clean))
    assert np.all(result.values == 0.0)
    _, corrupt = pair
    result = attribution_patching(model, clean, corrupt, "resid_pre.0[pos=*]", _metric(clean))
    assert result.values[3] != 0 and np.all(result.values[:3] == 0)


def test_compare_refuses_different_sweeps_and_metadata(gpt2, pair):
    clean, corrupt = pair
    atp = attribution_patching(gpt2, clean, corrupt, "head_out.*[head=*]", _metric(clean), normalize=True)
    assert atp.metadata["method"] == "attribution_patching" and atp.metadata["direction"] == "denoising"
    other = attribution_patching(gpt2, clean, corrupt, "mlp_out.*", _metric(clean))
    with pytest.raises(ValueError, match="different sites"):
        compare(atp, other)
    with pytest.raises(ValueError, match="direction"):
        attribution_patching(gpt2, clean, corrupt, "mlp_out.*", _metric(clean), direction="up")
