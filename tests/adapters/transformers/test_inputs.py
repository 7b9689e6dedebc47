"""Receiver-input sites (head_in, mlp_in, logits_in) for GPT-2 and Llama: capture, self-patch, hand computations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import crosspatch as cp
from conftest import randomize, tiny_gpt2, tiny_llama
from crosspatch.engine.interventions import Patch, Set


def with_inputs(model):
    """The wrapped model; its catalog has the receiver-input families."""
    m = cp.wrap(model)
    assert {"head_in", "mlp_in", "logits_in"} <= set(m.catalog.families)
    return m


MODELS = {"gpt2": lambda: randomize(tiny_gpt2()), "llama": lambda: randomize(tiny_llama())}


@pytest.fixture(params=sorted(MODELS))
def model(request):
    return with_inputs(MODELS[request.param]())


def test_capture_is_what_the_modules_read(model, ids):
    cache = model.capture(ids, ["head_in.*", "mlp_in.*", "logits_in", "resid_pre.*", "resid_mid.*", "resid_post.*"])
    for layer in range(2):
        pre = cache[f"resid_pre.{layer}"]
        head_in = cache[f"head_in.{layer}"]
        assert head_in.shape == (*pre.shape[:2], 3, 4, pre.shape[-1])
        assert torch.equal(head_in, pre[:, :, None, None, :].expand_as(head_in))
        assert torch.equal(cache[f"mlp_in.{layer}"], cache[f"resid_mid.{layer}"])
    assert torch.equal(cache["logits_in"], cache["resid_post.1"])


def test_self_patch_is_exact(model, ids):
    plain = model.run(ids).output
    cache = model.capture(ids, ["head_in.*", "mlp_in.*", "logits_in"])
    sites = {"head_in.1[qkv=0,head=2]": Patch(cache), "head_in.0": Patch(cache), "mlp_in.0": Patch(cache),
             "logits_in[pos=3]": Patch(cache)}
    assert torch.equal(model.run(ids, sites).output, plain)


def _gpt2_query_by_hand(gpt, x, edited, layer, head):
    """Layer ``layer``'s attention output with only ``head``'s query computed from ``edited``."""
    block = gpt.transformer.h[layer]
    attn = block.attn
    qkv = attn.c_attn(block.ln_1(x))
    q_new = attn.c_attn(block.ln_1(edited))
    d = x.shape[-1]
    dh = d // attn.num_heads
    cols = slice(head * dh, (head + 1) * dh)
    qkv[..., cols] = q_new[..., cols]
    q, k, v = qkv.split(d, dim=2)
    split = lambda t: t.view(*t.shape[:2], attn.num_heads, dh).transpose(1, 2)  # noqa: E731
    z = F.scaled_dot_product_attention(split(q), split(k), split(v), is_causal=True)
    return attn.c_proj(z.transpose(1, 2).reshape(x.shape))


def test_writing_one_heads_query_matches_a_hand_computation(ids):
    gpt = randomize(tiny_gpt2())
    m = with_inputs(gpt)
    torch.manual_seed(4)
    edited = torch.randn(ids.shape[0], ids.shape[1], 64)
    value = torch.zeros(ids.shape[0], ids.shape[1], 3, 4, 64)
    value[:, :, 0, 1] = edited
    cache = m.capture(ids, ["resid_pre.1", "head_in.1"])
    full = cache["head_in.1"].clone()
    full[:, :, 0, 1] = edited
    run = m.run(ids, {"head_in.1[qkv=0,head=1]": Patch(cp.Cache({"head_in.1": full}, {"head_in.1": ()}))},
                capture=["attn_out.1", "resid_pre.1"])
    with torch.no_grad():
        expected = _gpt2_query_by_hand(gpt, cache["resid_pre.1"], edited, 1, 1)
    torch.testing.assert_close(run.cache["attn_out.1"], expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(run.cache["resid_pre.1"], cache["resid_pre.1"])  # the residual stream itself is untouched


def _run_seeing_projections(m, ids, sites, layer):
    """The run's q_proj and k_proj outputs at ``layer`` (hooks registered once the forward reaches the
    projections, so after the engine's splice hooks) and its output."""
    attn = m.module.model.layers[layer].self_attn
    seen, handles = {}, []

    def late(name, proj):
        def pre(mod, args):
            handles.append(proj.register_forward_hook(lambda mod, a, o: seen.setdefault(name, o.detach().clone())))
        return pre

    handles += [attn.k_proj.register_forward_pre_hook(late("k", attn.k_proj)),
                attn.q_proj.register_forward_pre_hook(late("q", attn.q_proj))]
    try:
        out = m.run(ids, sites).output
    finally:
        for h in handles:
            h.remove()
    return seen, out


@pytest.mark.parametrize("kv_head", [0, 1])
def test_a_kv_heads_key_input_is_its_query_heads_slots_and_equals_a_hook_on_its_rows(ids, kv_head):
    """Grouped-query attention (4 query heads on 2 key/value heads): writing the key slots of query heads
    2j, 2j+1 (``head=2j:2j+2``) is patching key/value head j's key input, the same as a hand hook on its
    rows of k_proj; writing one of the two slots moves it half of the way (the mean of the slots)."""
    m = with_inputs(randomize(tiny_llama()))
    assert m.catalog.family("head_in").reach.kv_heads == 2
    layer = m.module.model.layers[1]
    cache = m.capture(ids, ["head_in.1"])
    x = cache["head_in.1"][:, :, 0, 0]
    edited = x + torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    full = cache["head_in.1"].clone()
    full[:, :, 1] = edited[:, :, None]
    source = cp.Cache({"head_in.1": full}, {"head_in.1": ()})
    rows = slice(16 * kv_head, 16 * (kv_head + 1))  # head_dim 16
    seen, out = _run_seeing_projections(m, ids, {f"head_in.1[qkv=1,head={2 * kv_head}:{2 * kv_head + 2}]": Patch(source)}, 1)

    def hook(mod, args, output):
        output = output.clone()
        output[..., rows] = F.linear(layer.input_layernorm(edited), mod.weight, mod.bias)[..., rows]
        return output

    with torch.no_grad():
        k_clean = layer.self_attn.k_proj(layer.input_layernorm(x))
        q_clean = layer.self_attn.q_proj(layer.input_layernorm(x))
        handle = layer.self_attn.k_proj.register_forward_hook(hook)
        try:
            by_hand = m.module(ids).logits
        finally:
            handle.remove()
    torch.testing.assert_close(out, by_hand, atol=1e-5, rtol=1e-5)
    other = slice(16 * (1 - kv_head), 16 * (2 - kv_head))
    assert torch.equal(seen["k"][..., other], k_clean[..., other])  # the other key/value head untouched
    assert torch.equal(seen["q"], q_clean)
    # one query head's key slot: the key/value head reads the mean of its two slots
    seen, _ = _run_seeing_projections(m, ids, {f"head_in.1[qkv=1,head={2 * kv_head + 1}]": Patch(source)}, 1)
    with torch.no_grad():
        half = layer.self_attn.k_proj(layer.input_layernorm(x + (edited - x) / 2))
    torch.testing.assert_close(seen["k"][..., rows], half[..., rows], atol=1e-5, rtol=1e-5)
    assert torch.equal(seen["k"][..., other], k_clean[..., other])


def test_mlp_in_changes_the_mlp_not_the_residual_passed_on(model, ids):
    cache = model.capture(ids, ["mlp_out.0", "resid_mid.0", "resid_post.0"])
    run = model.run(ids, {"mlp_in.0[pos=2]": Set(0.5)}, capture=["mlp_out.0", "resid_mid.0", "resid_post.0"])
    assert torch.equal(run.cache["resid_mid.0"], cache["resid_mid.0"])
    changed = (run.cache["mlp_out.0"] - cache["mlp_out.0"]).abs().amax(dim=(0, 2))
    assert changed[2] > 1e-3 and torch.all(changed[:2] == 0) and torch.all(changed[3:] == 0)
    torch.testing.assert_close(run.cache["resid_post.0"], run.cache["resid_mid.0"] + run.cache["mlp_out.0"])


def test_gradients_reach_head_in_through_unchanged_heads(ids):
    m = with_inputs(tiny_gpt2())
    from crosspatch.methods.attribution import attribution_patching

    torch.manual_seed(0)
    corrupt = ids.clone()
    corrupt[:, 2] = (ids[:, 2] + 5) % 98 + 2
    metric = cp.metrics.logit_diff(ids[:, -1], (ids[:, -1] + 1) % 100)
    res = attribution_patching(m, ids, corrupt, "head_in.1[qkv=*,head=*]", metric, direction="noising")
    assert res.values.shape == (3, 4) and (abs(res.values) > 0).all()


def test_gradients_through_an_identity_write_equal_the_plain_model():
    """A write that changes no value must not change any gradient (no path is counted twice)."""
    from conftest import randomize, tiny_gpt2

    model = randomize(tiny_gpt2())
    ids = torch.randint(2, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    m = cp.wrap(model)

    def grads(interventions):
        model.zero_grad()
        out = m.run(ids, interventions, grad=True).output
        out[:, -1].logsumexp(-1).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads(None)
    tapped = grads({"head_in.1": cp.Scale(1.0), "mlp_in.0": cp.Scale(1.0)})
    assert plain.keys() == tapped.keys()
    for name in plain:
        torch.testing.assert_close(tapped[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)
