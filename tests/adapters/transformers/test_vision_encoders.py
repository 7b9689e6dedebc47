"""Vision encoders (ViT, DeiT, DINOv2 with its layer scale, SigLIP's vision tower, CLIP's image classifier) on images, and BLOOM,
whose attention and MLP add the residual they are handed themselves (so do MPT's MLP and
RoBERTa-PreLayerNorm's ViT-style branches): served by architecture inference
(crosspatch.adapters.transformers.infer) and its proof, checked here by the conformance suite and against
transformers' own hidden states and attentions and hand-written hooks; heads are counted off the
pattern where the config names others (Whisper's decoder)."""

from __future__ import annotations

import warnings

import pytest
import torch

import crosspatch as cp
from crosspatch.adapters.transformers.mapping import mapping_for
from crosspatch.adapters.transformers.tiny import tiny_model
from crosspatch.engine.forward import execute
from crosspatch.testing import check_adapter

ALL = {"embed", "resid_pre", "head_in", "attn_pattern", "head_z", "head_out", "attn_out", "resid_mid", "mlp_act",
       "mlp_out", "resid_post", "logits"}
VISION = ["vit", "deit", "dinov2", "siglip", "clip"]  # CLIP's image classifier: its vision tower alone
TYPES = VISION + ["bloom"]
POSITIONS = {"vit": 17, "deit": 18, "dinov2": 17, "siglip": 16, "clip": 17}  # 32x32 images of 8x8 patches + class (and distillation) tokens

# The output projection of block 1, written out by hand for the hook oracles.
O_PROJ = {
    "vit": lambda model: model.vit.layers[1].attention.o_proj,
    "deit": lambda model: model.deit.layers[1].attention.o_proj,
    "dinov2": lambda model: model.dinov2.encoder.layer[1].attention.o_proj,
    "siglip": lambda model: model.vision_model.encoder.layers[1].self_attn.out_proj,
    "clip": lambda model: model.vision_model.encoder.layers[1].self_attn.out_proj,
    "bloom": lambda model: model.transformer.h[1].self_attention.dense,
}


def build(model_type: str):
    model = tiny_model(model_type, "causal-lm" if model_type == "bloom" else "image-classification")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # families a proof drops are asserted below, not warned about here
        return model, cp.wrap(model)


def inputs(model_type: str, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if model_type == "bloom":
        return torch.randint(0, 100, (2, 7), generator=gen)
    return torch.randn(2, 3, 32, 32, generator=gen)


def forward(model, model_type: str, x: torch.Tensor, **kwargs):
    with torch.no_grad():
        return model(**{("input_ids" if model_type == "bloom" else "pixel_values"): x}, **kwargs)


@pytest.mark.parametrize("model_type", TYPES)
def test_every_family_is_served(model_type):
    model, m = build(model_type)
    names = {f.name for f in m.sites()}
    if model_type == "bloom":  # head_in through its fused projection, columns [head, q/k/v, d_head]
        assert names == ALL and mapping_for(model).layout.head_major
    else:
        assert names == ALL, m.catalog.unavailable
        assert m.catalog.family("resid_pre").axis("pos").size == POSITIONS[model_type]
        assert m.catalog.family("logits").axis_names == ("label",)
    assert m.describe()["mapping"] == "inferred"
    assert m.describe()["n_heads"] == 4


@pytest.mark.parametrize("model_type", TYPES)
def test_conformance_suite_passes(model_type):
    model, m = build(model_type)
    report = check_adapter(model, inputs(model_type), m.adapter, cuda=False)
    assert not report.failures, str(report)


@pytest.mark.parametrize("model_type", TYPES)
def test_residual_stream_equals_transformers_hidden_states(model_type):
    model, m = build(model_type)
    x = inputs(model_type, 1)
    cache = m.capture(x, ["resid_pre.*", "embed"])
    hidden = forward(model, model_type, x, output_hidden_states=True).hidden_states
    for layer in range(len(hidden) - 1):
        torch.testing.assert_close(cache[f"resid_pre.{layer}"], hidden[layer], atol=0, rtol=0)
    torch.testing.assert_close(cache["embed"], hidden[0], atol=0, rtol=0)


@pytest.mark.parametrize("model_type", TYPES)
def test_zeroing_one_head_equals_a_hook_on_the_output_projection(model_type):
    model, m = build(model_type)
    x = inputs(model_type, 2)

    def zero_head(module, args):
        z = args[0].clone()
        z[..., 2 * 16:3 * 16] = 0  # head 2 of 4, 16 wide
        return (z, *args[1:])

    got = m.run(x, {"head_out.1[head=2]": cp.Zero()}).output
    handle = O_PROJ[model_type](model).register_forward_pre_hook(zero_head)
    try:
        expected = forward(model, model_type, x).logits
    finally:
        handle.remove()
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    assert not torch.allclose(got, m.run(x).output, atol=1e-6)


@pytest.mark.parametrize("model_type", VISION)
def test_a_patch_at_one_patch_moves_only_that_position_until_attention_mixes_it(model_type):
    model, m = build(model_type)
    clean, corrupt, p = inputs(model_type, 3), inputs(model_type, 4), 5
    source = m.capture(clean, ["resid_pre.0"])
    base = m.capture(corrupt, ["resid_pre.*"])
    patched = m.run(corrupt, {f"resid_pre.0[pos={p}]": cp.Patch(source)}, capture=["resid_pre.*"]).cache
    others = [i for i in range(POSITIONS[model_type]) if i != p]
    torch.testing.assert_close(patched["resid_pre.0"][:, others], base["resid_pre.0"][:, others], atol=0, rtol=0)
    torch.testing.assert_close(patched["resid_pre.0"][:, p], source["resid_pre.0"][:, p], atol=0, rtol=0)
    # Non-causal: the next layer's input changes at every position, earlier ones included.
    moved = (patched["resid_pre.1"] - base["resid_pre.1"]).abs().amax(dim=(0, 2))
    assert bool((moved > 1e-7).all()), moved


def test_a_patch_in_bloom_leaves_earlier_positions_alone():
    model, m = build("bloom")
    clean, corrupt = inputs("bloom", 3), inputs("bloom", 4)
    source = m.capture(clean, ["resid_pre.0"])
    base = m.run(corrupt, capture=["resid_pre.1"])
    patched = m.run(corrupt, {"resid_pre.0[pos=3]": cp.Patch(source)}, capture=["resid_pre.1"])
    torch.testing.assert_close(patched.output[:, :3], base.output[:, :3], atol=0, rtol=0)
    torch.testing.assert_close(patched.cache["resid_pre.1"][:, :3], base.cache["resid_pre.1"][:, :3], atol=0, rtol=0)
    assert not torch.allclose(patched.output[:, 3:], base.output[:, 3:])


@pytest.mark.parametrize("model_type", TYPES)
def test_patterns_equal_transformers_eager_attentions(model_type):
    model, m = build(model_type)
    x = inputs(model_type, 5)
    cache = m.capture(x, ["attn_pattern.*"])
    before, model.config._attn_implementation = model.config._attn_implementation, "eager"
    try:
        expected = forward(model, model_type, x, output_attentions=True).attentions
    finally:
        model.config._attn_implementation = before
    for layer, pattern in enumerate(expected):
        torch.testing.assert_close(cache[f"attn_pattern.{layer}"], pattern, atol=1e-6, rtol=0)


def test_images_are_taken_one_at_a_time_or_by_name_and_token_ids_are_refused():
    model, m = build("vit")
    x = inputs("vit", 6)
    batched = m.run(x).output
    torch.testing.assert_close(m.run(x[0]).output, batched[:1], atol=1e-6, rtol=0)
    torch.testing.assert_close(m.run({"pixel_values": x}).output, batched, atol=0, rtol=0)
    with pytest.raises(ValueError, match="takes images"):
        m.run(torch.randint(0, 10, (2, 7)))
    assert len(m.catalog.expand("resid_pre.1[pos=*]").sites) == POSITIONS["vit"]


# BLOOM: branch writes read as output - residual and written as residual + new -----------------------


def _hooked(module, fn):
    return module.register_forward_hook(lambda mod, args, output: fn(output))


@pytest.mark.parametrize("family,linear", [("attn_out", "self_attention.dense"), ("mlp_out", "mlp.dense_4h_to_h")])
def test_bloom_branch_writes_are_their_projections_outputs(family, linear):
    model, m = build("bloom")
    x = inputs("bloom", 7)
    seen = {}
    handles = [_hooked(block.get_submodule(linear), lambda out, i=i: seen.setdefault(i, out.clone()))
               for i, block in enumerate(model.transformer.h)]
    try:
        cache = m.capture(x, [f"{family}.*", "resid_pre.*", "resid_mid.*", "resid_post.*"])
    finally:
        for handle in handles:
            handle.remove()
    before, after = ("resid_pre", "resid_mid") if family == "attn_out" else ("resid_mid", "resid_post")
    for layer in range(2):
        torch.testing.assert_close(cache[f"{family}.{layer}"], seen[layer], atol=1e-6, rtol=0)
        torch.testing.assert_close(cache[f"{before}.{layer}"] + cache[f"{family}.{layer}"], cache[f"{after}.{layer}"],
                                   atol=1e-6, rtol=0)

    # A write equals a hook adding the same change to the projection's output.
    delta = torch.randn(64, generator=torch.Generator().manual_seed(8))
    got = m.run(x, {f"{family}.1": lambda a: a + delta}).output
    handle = _hooked(model.transformer.h[1].get_submodule(linear), lambda out: out + delta)
    try:
        expected = forward(model, "bloom", x).logits
    finally:
        handle.remove()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_bloom_attn_out_gradient_equals_the_projections():
    model, m = build("bloom")
    x = inputs("bloom", 9)
    held = {}

    def tap(a):
        a = a.clone()
        a.retain_grad()
        held["a"] = a
        return a

    run = m.run(x, {"attn_out.0": tap}, grad=True)
    run.output[:, -1, :5].sum().backward()

    def keep(out):
        out.retain_grad()
        held["dense"] = out

    handle = _hooked(model.transformer.h[0].self_attention.dense, keep)
    try:
        model(input_ids=x).logits[:, -1, :5].sum().backward()
    finally:
        handle.remove()
    torch.testing.assert_close(held["a"].grad, held["dense"].grad, atol=1e-6, rtol=0)


def test_bloom_output_at_one_position_keeps_the_mlp_whole():
    """The last MLP is handed the residual it adds: it runs on every position, and the output there is unchanged."""
    model, m = build("bloom")
    x = inputs("bloom", 10)
    positions = torch.tensor([6, 3])
    full = execute(model, m.adapter, m.catalog, m.prepare(x)).output
    narrowed = execute(model, m.adapter, m.catalog, m.prepare(x), output_at=positions).output
    rows = torch.arange(2)
    torch.testing.assert_close(narrowed[rows, positions], full[rows, positions], atol=1e-6, rtol=0)


def test_mpts_mlp_adds_its_residual_and_writes_what_its_down_projection_gives():
    model = tiny_model("mpt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = cp.wrap(model)
    assert mapping_for(model).arch.mlp_residual == "residual"
    x = inputs("bloom", 11)
    seen = {}
    handle = _hooked(model.transformer.blocks[1].ffn.down_proj, lambda out: seen.setdefault("down", out.clone()))
    try:
        cache = m.capture(x, ["mlp_out.1"])
    finally:
        handle.remove()
    torch.testing.assert_close(cache["mlp_out.1"], seen["down"], atol=1e-6, rtol=0)
    report = check_adapter(model, x, m.adapter, cuda=False)
    assert not report.failures, str(report)


def test_heads_are_the_patterns_where_the_config_names_others():
    """WhisperForCausalLM's config answers num_attention_heads with the encoder's heads; its decoder has more."""
    model = tiny_model("whisper", decoder_attention_heads=4, encoder_attention_heads=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = cp.wrap(model)
    assert model.config.num_attention_heads == 2
    assert m.catalog.family("head_out").axis("head").size == 4 == m.describe()["n_heads"]
    x = inputs("bloom", 12)
    assert m.capture(x, ["attn_pattern.0"])["attn_pattern.0"].shape[1] == 4


def test_pre_ln_roberta_adds_the_residual_inside_both_branches():
    """RoBERTa-PreLayerNorm: the attention norms its input inside and adds it back, the MLP's ``output`` module
    adds the ``input_tensor`` it is handed (the ViT-style ``dense(x) + input_tensor``)."""
    model = tiny_model("roberta-prelayernorm", "masked-lm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = cp.wrap(model)
    arch = mapping_for(model).arch
    assert (arch.attn_residual, arch.mlp_residual) == ("hidden_states", "input_tensor")
    x = inputs("bloom", 13)
    layer = model.roberta_prelayernorm.encoder.layer[1]
    seen = {}
    handles = [_hooked(layer.attention.output.dense, lambda out: seen.setdefault("attn", out.clone())),
               _hooked(layer.output.dense, lambda out: seen.setdefault("mlp", out.clone()))]
    try:
        cache = m.capture(x, ["attn_out.1", "mlp_out.1", "resid_pre.*"])
    finally:
        for handle in handles:
            handle.remove()
    torch.testing.assert_close(cache["attn_out.1"], seen["attn"], atol=1e-6, rtol=0)
    torch.testing.assert_close(cache["mlp_out.1"], seen["mlp"], atol=1e-6, rtol=0)
    hidden = forward(model, "bloom", x, output_hidden_states=True).hidden_states
    for i in range(2):
        torch.testing.assert_close(cache[f"resid_pre.{i}"], hidden[i], atol=0, rtol=0)
    report = check_adapter(model, x, m.adapter, cuda=False)
    assert not report.failures, str(report)
