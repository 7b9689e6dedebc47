"""float64 and bfloat16 models: captures keep the model's dtype, interventions work and self-patch is exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import crosspatch as cp
from conftest import randomize, tiny_gpt2, tiny_llama
from reference_gpt2 import gpt2_reference

ALL_SITES = ["embed", "resid_pre.*", "attn_pattern.*", "head_z.*", "head_out.*", "attn_out.*", "resid_mid.*", "mlp_act.*",
             "mlp_out.*", "resid_post.*", "logits"]
T = 9
MODELS = {"gpt2": tiny_gpt2, "llama": tiny_llama}


def build(name, dtype):
    model = randomize(MODELS[name]()).to(dtype)
    return model, cp.wrap(model)


def ids_for(seed, rows=3):
    return torch.randint(2, 100, (rows, T), generator=torch.Generator().manual_seed(seed))


def exact(a, b, msg=""):
    torch.testing.assert_close(a, b, atol=0, rtol=0, msg=(lambda m: f"{msg}: {m}") if msg else None)


# float64 --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(MODELS))
def test_float64_capture_patch_and_self_patch(name):
    model, m = build(name, torch.float64)
    assert m.dtype == torch.float64
    ids, other = ids_for(1), ids_for(2)
    source = m.run(ids, capture=ALL_SITES)
    assert source.output.dtype == torch.float64
    assert all(v.dtype == torch.float64 for v in source.cache.values())
    keys = m.capture_keys(ALL_SITES, m.prepare(ids))
    run = m.run(ids, {k: cp.Patch(source.cache) for k in keys})
    exact(run.output, source.output, "self-patch")
    patched = m.run(ids, {"head_out.1[head=2]": cp.Patch(other), "resid_pre.1[pos=4]": cp.Patch(other)})
    assert patched.output.dtype == torch.float64
    assert not torch.allclose(patched.output, source.output, atol=1e-6)
    exact(patched.output[:, :4], m.run(ids, {"head_out.1[head=2]": cp.Patch(other)}).output[:, :4])
    with torch.no_grad():
        torch.testing.assert_close(m.run(ids).output, model(ids).logits, atol=0, rtol=0)
    if name == "gpt2":
        ref = gpt2_reference(model, ids)
        for key in ref:
            torch.testing.assert_close(source.cache[key], ref[key], atol=1e-10, rtol=0, msg=lambda s: f"{key}: {s}")


# bfloat16 -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(MODELS))
def test_bf16_captures_and_self_patch(name):
    model, m = build(name, torch.bfloat16)
    ids = ids_for(1)
    source = m.run(ids, capture=ALL_SITES)
    assert source.output.dtype == torch.bfloat16
    for key, value in source.cache.items():
        assert value.dtype == torch.bfloat16, key
        assert torch.isfinite(value).all(), key
    patterns = source.cache["attn_pattern.0"].float()
    torch.testing.assert_close(patterns.sum(-1), torch.ones_like(patterns.sum(-1)), atol=2e-2, rtol=0)
    keys = m.capture_keys(ALL_SITES, m.prepare(ids))
    run = m.run(ids, {k: cp.Patch(source.cache) for k in keys}, capture=ALL_SITES)
    exact(run.output, source.output, "self-patch")
    for key in source.cache:
        exact(run.cache[key], source.cache[key], key)
    # per-head and per-position self-patches go through the head and residual write paths
    heads = {str(s): cp.Patch(source.cache) for s in m.catalog.expand("head_out.*[head=*]").sites}
    exact(m.run(ids, heads, capture="attn_pattern.0").output, source.output, "per-head self-patch")
    plain = m.capture(ids, ["resid_mid.*", "logits"])
    run = m.run(ids, {"resid_mid.0[pos=3]": cp.Patch(plain), "resid_mid.1": cp.Patch(plain)})
    exact(run.output, plain["logits"], "resid_mid self-patch")


SITE = "resid_post.0[pos=2]"


def _capture_at(m, ids, intervention):
    run = m.run(ids, {SITE: intervention}, capture=["resid_post.0", "logits"])
    value = run.cache["resid_post.0"]
    assert value.dtype == torch.bfloat16 and run.output.dtype == torch.bfloat16
    assert torch.isfinite(run.output).all()
    return value


@pytest.mark.parametrize("name", list(MODELS))
def test_bf16_interventions(name):
    model, m = build(name, torch.bfloat16)
    ids, other, reference = ids_for(1), ids_for(2), ids_for(3, rows=5)
    clean = m.capture(ids, "resid_post.0")["resid_post.0"]
    keep = [p for p in range(T) if p != 2]

    def check(value, expected_at_2):
        exact(value[:, keep], clean[:, keep], "untouched positions")
        exact(value[:, 2], expected_at_2, "edited position")

    src = m.capture(other, "resid_post.0")["resid_post.0"]
    check(_capture_at(m, ids, cp.Patch(other)), src[:, 2])
    check(_capture_at(m, ids, cp.Zero()), torch.zeros_like(clean[:, 2]))

    ref = m.capture(reference, "resid_post.0")["resid_post.0"]
    mean = ref.float().mean(0).to(torch.bfloat16)
    check(_capture_at(m, ids, cp.Mean(reference)), mean[2].expand(3, -1))

    vector = torch.linspace(-2, 2, 64)
    check(_capture_at(m, ids, cp.Add(vector, alpha=0.5)), clean[:, 2] + 0.5 * vector.to(torch.bfloat16))

    noisy = _capture_at(m, ids, cp.Noise(scale=1.0, seed=4))
    gen = torch.Generator().manual_seed(4)
    draw = torch.randn((3, 1, 64), generator=gen, dtype=torch.float32)
    expected = (clean[:, 2:3].float() + draw * clean.float().std()).to(torch.bfloat16)
    check(noisy, expected[:, 0])
    exact(_capture_at(m, ids, cp.Noise(scale=1.0, seed=4)), noisy, "same seed")
    assert not torch.equal(_capture_at(m, ids, cp.Noise(scale=1.0, seed=5)), noisy)

    # interventions at other families keep bf16 end to end
    for site, intervention in [
        ("head_out.1[head=3]", cp.Noise(seed=1)),
        ("attn_pattern.0[head=1]", cp.Scale(0.5)),
        ("mlp_act.1[neuron={3,7}]", cp.Mean(reference)),
        ("embed[pos=0]", cp.Add(vector)),
    ]:
        run = m.run(ids, {site: intervention}, capture=cp.Site.parse(site).key)
        assert run.output.dtype == torch.bfloat16 and torch.isfinite(run.output).all(), site
        assert run.cache[cp.Site.parse(site).key].dtype == torch.bfloat16, site


@pytest.mark.parametrize("name", list(MODELS))
def test_bf16_activation_patching_sweep(name):
    model, m = build(name, torch.bfloat16)
    clean = ids_for(1, rows=2)
    corrupt = clean.clone()
    corrupt[:, 3] = (clean[:, 3] + 17) % 98 + 2
    answer = clean[:, -1]
    metric = cp.metrics.logit_diff(answer, (answer + 1) % 100)
    res = cp.activation_patching(m, clean, corrupt, "resid_pre.*[pos=*]", metric, progress=False)
    values = np.asarray(res.values)
    assert values.shape == (2, T)
    assert np.isfinite(values).all()
    # positions after the corrupted token cannot carry its information into layer 0's input
    assert (values[0, :3] == 0).all()
    res = cp.activation_patching(m, clean, corrupt, "head_out.*[head=*]", metric, progress=False, batch_size=4)
    assert np.asarray(res.values).shape == (2, 4) and np.isfinite(np.asarray(res.values)).all()
