"""Families with no table entry, served by architecture inference (crosspatch.adapters.transformers.infer)
and its proof: tiny random models built from each config class, checked by the conformance suite and
against transformers' own hidden states and hand-written hooks."""

from __future__ import annotations

import warnings

import pytest
import torch

import crosspatch as cp
from hand_hooks import logits_with, zero_head
from crosspatch.adapters.transformers.mapping import mapping_for
from crosspatch.adapters.transformers.tiny import tiny_model
from crosspatch.testing import check_adapter

# model type -> families that must be served (beyond embed, resid_pre/post, attn_out, mlp_out, logits)
FAMILIES = {
    "gemma": {"head_out", "head_z", "attn_pattern", "resid_mid", "mlp_act"},
    "gemma2": {"head_out", "head_z", "attn_pattern", "resid_mid", "mlp_act"},  # logit soft-capping, sandwich norms
    "gemma3_text": {"head_out", "head_z", "attn_pattern", "resid_mid", "mlp_act"},  # sliding and global layers
    "qwen3": {"head_out", "head_in", "mlp_in", "logits_in", "attn_pattern", "mlp_act"},  # q/k norms
    "phi": {"head_out", "head_in", "mlp_act"},  # parallel residual
    "phi3": {"head_out", "resid_mid", "mlp_act"},  # fused qkv and gate-up
    "olmo": {"head_out", "resid_mid", "mlp_act"},
    "olmo2": {"head_out", "head_in", "resid_mid", "mlp_act"},
    "gptj": {"head_out", "head_in", "mlp_act"},  # parallel residual, partial rotary
    "gpt_neo": {"head_out", "head_in", "resid_mid", "mlp_in", "mlp_act"},
    "stablelm": {"head_out", "head_in", "mlp_in", "mlp_act"},
    "smollm3": {"head_out", "head_in", "mlp_in", "mlp_act"},
    "mixtral": {"head_out", "head_in", "resid_mid"},  # mixture of experts: the MLP's write is the routed sum
    "qwen2_moe": {"head_out", "head_in", "resid_mid"},
    "opt": {"head_out", "head_in", "resid_mid", "mlp_in", "mlp_act", "logits_in"},  # its MLP sees the tokens flattened
}
BASE = {"embed", "resid_pre", "attn_out", "mlp_out", "resid_post", "logits"}
TYPES = sorted(FAMILIES)
EMBEDDED_INLINE = {"opt"}  # adds token and position embeddings outside any module: resid_pre.0 holds them


def ids(seed: int = 0, rows: int = 2, length: int = 6) -> torch.Tensor:
    return torch.randint(0, 100, (rows, length), generator=torch.Generator().manual_seed(seed))


def wrapped(model_type: str):
    model = tiny_model(model_type)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # families the proof drops are asserted below, not warned about here
        return model, cp.wrap(model)


@pytest.mark.parametrize("model_type", TYPES)
def test_inferred_families_are_served_and_described(model_type):
    model, m = wrapped(model_type)
    names = {f.name for f in m.sites()}
    base = BASE - {"embed"} if model_type in EMBEDDED_INLINE else BASE
    assert base | FAMILIES[model_type] <= names, (names, m.catalog.unavailable)
    assert m.describe()["mapping"] == "inferred"
    for name, why in m.catalog.unavailable.items():
        assert name not in names and why
        with pytest.raises(cp.SiteError, match=name):
            m.catalog.family(name)


# transformers' grouped expert matmul takes no float64, so these models cannot run the dtype check's double copy.
NO_FLOAT64 = {"mixtral", "qwen2_moe"}


@pytest.mark.parametrize("model_type", TYPES)
def test_conformance_suite_passes(model_type):
    model, m = wrapped(model_type)
    skip = ("dtype",) if model_type in NO_FLOAT64 else ()
    report = check_adapter(model, ids(), m.adapter, cuda=False, skip=skip)
    assert not report.failures, str(report)


@pytest.mark.parametrize("model_type", TYPES)
def test_residual_stream_equals_transformers_hidden_states(model_type):
    """A second computation that must agree: transformers' own hidden states enter each block."""
    model, m = wrapped(model_type)
    x = ids(1)
    cache = m.capture(x, ["resid_pre.*"])
    with torch.no_grad():
        hidden = model(x, output_hidden_states=True).hidden_states
    for layer in range(len(hidden) - 1):
        torch.testing.assert_close(cache[f"resid_pre.{layer}"], hidden[layer], atol=1e-5, rtol=0)


@pytest.mark.parametrize("model_type", TYPES)
def test_zeroing_one_head_equals_a_hook_on_the_output_projection(model_type):
    model, m = wrapped(model_type)
    x = ids(2)
    mp = mapping_for(model).arch
    o_proj = model.base_model.get_submodule(f"{mp.layers}.1.{mp.o_proj}")
    n_heads = m.catalog.family("head_out").axis("head").size
    d_head = m.catalog.family("head_z").axis("d_head").size

    assert n_heads > 2
    got = m.run(x, {"head_out.1[head=2]": cp.Zero()}).output
    torch.testing.assert_close(got, logits_with(model, o_proj, zero_head(2, d_head), x, pre=True), atol=1e-5, rtol=0)


def test_a_patch_leaves_earlier_positions_alone():
    model, m = wrapped("gemma2")
    clean, corrupt = ids(3), ids(4)
    cache = m.capture(clean, ["resid_pre.1"])
    base = m.run(corrupt).output
    out = m.run(corrupt, {"resid_pre.1[pos=3]": cp.Patch(cache)}).output
    torch.testing.assert_close(out[:, :3], base[:, :3], atol=0, rtol=0)
    assert not torch.allclose(out[:, 3:], base[:, 3:])


def test_activation_patching_on_an_inferred_model_equals_hand_hooks():
    model, m = wrapped("qwen3")
    clean, corrupt = ids(5), ids(6)
    answer, distractor = clean[:, -1], (clean[:, -1] + 1) % 100
    metric = cp.metrics.logit_diff(answer, distractor)
    res = cp.activation_patching(m, clean, corrupt, "resid_pre.*[pos=2]", metric)
    block = model.model.layers
    with torch.no_grad():
        source = model(clean, output_hidden_states=True).hidden_states
        base = metric(model(corrupt).logits).mean()
    for layer in range(len(block)):
        def patch(module, args, kwargs, layer=layer):
            h = (kwargs.get("hidden_states", args[0] if args else None)).clone()
            h[:, 2] = source[layer][:, 2]
            if "hidden_states" in kwargs:
                return args, {**kwargs, "hidden_states": h}
            return (h, *args[1:]), kwargs

        handle = block[layer].register_forward_pre_hook(patch, with_kwargs=True)
        try:
            with torch.no_grad():
                effect = metric(model(corrupt).logits).mean() - base
        finally:
            handle.remove()
        assert abs(float(res.values[layer]) - float(effect)) < 1e-5


def test_float64_is_refused_by_the_model_itself_not_by_crosspatch():
    model = tiny_model("mixtral").double()
    with pytest.raises(RuntimeError, match="Double"):
        model(ids())


def test_a_model_inference_cannot_read_falls_back_to_module_sites_with_the_reason():
    model = tiny_model("jetmoe")  # its attention writes through a mixture of output experts, no one projection
    with pytest.raises(cp.AdapterError, match="no linear layer of self_attention"):
        cp.wrap(model, "transformers")
    with pytest.warns(UserWarning, match="no linear layer of self_attention"):
        m = cp.wrap(model)
    assert m.adapter.name == "generic"
    x = ids()
    cache = m.capture(x, ["module.model.layers.*"])
    with torch.no_grad():
        hidden = model(x, output_hidden_states=True).hidden_states
    torch.testing.assert_close(cache["module.model.layers.0"], hidden[1], atol=0, rtol=0)


def test_opts_flattened_mlp_sites_equal_hooks_on_its_modules():
    """OPT runs its MLP on the tokens flattened to [batch * pos, d]: the sites are unflattened."""
    model, m = wrapped("opt")
    x = ids(4)
    block = model.model.decoder.layers[1]
    seen = {}
    hooks = [block.fc2.register_forward_pre_hook(lambda module, args: seen.__setitem__("act", args[0])),
             block.fc2.register_forward_hook(lambda module, args, output: seen.__setitem__("out", output))]
    try:
        cache = m.capture(x, ["mlp_act.1", "mlp_out.1", "mlp_in.1", "resid_mid.1"])
    finally:
        for handle in hooks:
            handle.remove()
    torch.testing.assert_close(cache["mlp_act.1"], seen["act"].unflatten(0, x.shape), atol=0, rtol=0)
    torch.testing.assert_close(cache["mlp_out.1"], seen["out"].unflatten(0, x.shape), atol=0, rtol=0)
    torch.testing.assert_close(cache["mlp_in.1"], cache["resid_mid.1"], atol=0, rtol=0)
    zeroed = m.run(x, {"mlp_act.1[pos=2]": cp.Zero()}).output
    handle = block.fc2.register_forward_pre_hook(lambda module, args: (args[0].unflatten(0, x.shape).index_fill(1, torch.tensor([2]), 0).flatten(0, 1),))
    try:
        with torch.no_grad():
            expected = model(x).logits
    finally:
        handle.remove()
    torch.testing.assert_close(zeroed, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("model_type,overrides", [
    ("gemma2", {"initializer_range": 0.1, "attn_logit_softcapping": 5.0}),  # logit soft-capping
    ("gpt_oss", {"initializer_range": 0.1}),  # attention sinks: rows sum to less than 1
])
def test_patterns_equal_transformers_eager_attentions(model_type, overrides):
    model = tiny_model(model_type, **overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = cp.wrap(model)
    assert "attn_pattern" in {f.name for f in m.sites()}, m.catalog.unavailable
    x = ids(7)
    cache = m.capture(x, ["attn_pattern.*"])
    before, model.config._attn_implementation = model.config._attn_implementation, "eager"
    try:
        with torch.no_grad():
            expected = model(x, output_attentions=True).attentions
    finally:
        model.config._attn_implementation = before
    for layer, pattern in enumerate(expected):
        torch.testing.assert_close(cache[f"attn_pattern.{layer}"], pattern, atol=1e-6, rtol=0)
