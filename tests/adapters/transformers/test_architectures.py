"""Every supported non-GPT-2 architecture: catalog, reads against HF outputs and block arithmetic, writes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pytest
import torch

import crosspatch as cp
from conftest import randomize, tiny_bert, tiny_gpt2, tiny_llama, tiny_neox, tiny_roberta

N_LAYER, N_HEAD, T = 2, 4, 8
ALL_SITES = ["embed", "resid_pre.*", "attn_pattern.*", "head_out.*", "attn_out.*", "resid_mid.*", "mlp_act.*",
             "mlp_out.*", "resid_post.*", "logits"]


@dataclass(frozen=True)
class Spec:
    make: Callable
    block: str  # "pre" (x + attn, then + mlp), "parallel" (x + attn + mlp) or "post" (BERT: LayerNorm after each add)
    layers: str  # block list, from the base model
    o_proj: str  # from a block
    mlp_down: str  # from a block
    final_norm: str | None = None  # from the base model
    logits: tuple | None = ("pos", "vocab")
    o_bias: bool = True

    @property
    def decoder(self) -> bool:
        return self.block != "post"


_LLAMA = dict(block="pre", layers="layers", o_proj="self_attn.o_proj", mlp_down="mlp.down_proj", final_norm="norm", o_bias=False)
_NEOX = dict(layers="layers", o_proj="attention.dense", mlp_down="mlp.dense_4h_to_h", final_norm="final_layer_norm")
_BERT = dict(block="post", layers="encoder.layer", o_proj="attention.output.dense", mlp_down="output.dense")

SPECS = {
    "llama": Spec(lambda: tiny_llama("llama"), **_LLAMA),
    "mistral": Spec(lambda: tiny_llama("mistral"), **_LLAMA),
    "qwen2": Spec(lambda: tiny_llama("qwen2"), **_LLAMA),
    "neox_parallel": Spec(lambda: tiny_neox(parallel=True), block="parallel", **_NEOX),
    "neox_sequential": Spec(lambda: tiny_neox(parallel=False), block="pre", **_NEOX),
    "bert_mlm": Spec(lambda: tiny_bert("mlm"), **_BERT),
    "bert_base": Spec(lambda: tiny_bert("base"), logits=None, **_BERT),
    "bert_cls": Spec(lambda: tiny_bert("cls"), logits=("label",), **_BERT),
    "roberta": Spec(tiny_roberta, **_BERT),
}
ARCHS = list(SPECS)


def build(arch):
    spec = SPECS[arch]
    model = randomize(spec.make())
    return spec, model, cp.wrap(model)


def blocks(spec, model):
    return list(model.base_model.get_submodule(spec.layers))


def ids_for(seed, rows=2, length=T):
    return torch.randint(3, 100, (rows, length), generator=torch.Generator().manual_seed(seed))


def hf(model, ids, **kwargs):
    with torch.no_grad():
        return model(ids, **kwargs)


def close(a, b, atol=1e-5, msg=""):
    torch.testing.assert_close(a, b, atol=atol, rtol=0, msg=(lambda m: f"{msg}: {m}") if msg else None)


# Catalog --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_catalog_families(arch):
    spec, model, m = build(arch)
    names = [fam.name for fam in m.sites()]
    expected = ["embed", "resid_pre", "attn_pattern", "head_z", "head_out", "attn_out", "resid_mid", "mlp_act", "mlp_out", "resid_post"]
    if spec.block == "parallel":
        expected.remove("resid_mid")
    if spec.logits is not None:
        expected.append("logits")
    if arch in ("llama", "mistral", "qwen2", "neox_sequential"):  # pre-LN sequential decoders: receiver inputs
        expected += ["head_in", "mlp_in", "logits_in"]
    else:  # parallel residual and post-LN encoders: per-head q/k/v inputs only
        expected.append("head_in")
    assert sorted(names) == sorted(expected)
    cat = m.catalog
    assert cat.family("head_out").axis("head").size == N_HEAD  # query heads, also under grouped-query attention
    assert cat.family("attn_pattern").axis("head").size == N_HEAD
    assert cat.family("attn_pattern").axis_names == ("head", "pos", "key_pos")
    assert cat.family("mlp_act").axis("neuron").size == 128
    for fam in cat:
        if fam.name not in ("embed", "logits", "logits_in"):
            assert fam.layers == N_LAYER, fam.name
    if spec.logits is not None:
        assert cat.family("logits").axis_names == spec.logits
        assert cat.family("logits").axes[-1].size == (3 if spec.logits == ("label",) else 100)
    else:
        with pytest.raises(cp.SiteError):
            cat.resolve("logits")


def test_gqa_models_really_are_grouped():
    for kind in ("llama", "mistral", "qwen2"):
        model = tiny_llama(kind)
        attn = model.model.layers[0].self_attn
        assert attn.k_proj.out_features == attn.o_proj.in_features // 2  # 2 kv heads for 4 query heads


# Reads against HF's own outputs -------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_residual_stream_matches_hidden_states(arch):
    spec, model, m = build(arch)
    ids = ids_for(1)
    seen = {}
    norm = model.base_model.get_submodule(spec.final_norm) if spec.final_norm else None
    # our own hook, active during crosspatch's run, sees the final norm's input in the very same forward
    handle = norm.register_forward_pre_hook(lambda mod, args: seen.setdefault("x", args[0])) if norm else None
    try:
        run = m.run(ids, capture=["embed", "resid_pre.*", "resid_post.*"])
    finally:
        if handle is not None:
            handle.remove()
    out = hf(model, ids, output_hidden_states=True)
    hs = out.hidden_states
    assert len(hs) == N_LAYER + 1
    close(run.cache["embed"], hs[0], atol=0, msg="embed")
    for l in range(N_LAYER):
        close(run.cache[f"resid_pre.{l}"], hs[l], atol=1e-6, msg=f"resid_pre.{l}")
    for l in range(N_LAYER - 1):
        close(run.cache[f"resid_pre.{l + 1}"], run.cache[f"resid_post.{l}"], atol=0)
    final = run.cache[f"resid_post.{N_LAYER - 1}"]
    if spec.decoder:  # hidden_states[-1] is after the final norm; the residual before it is resid_post
        close(final, seen["x"], atol=0, msg="final norm input")
        with torch.no_grad():
            close(norm(final), hs[-1], atol=1e-5, msg="norm(resid_post)")
        assert not torch.allclose(final, hs[-1], atol=1e-2)
    else:  # encoders: the last hidden state is the last block's output
        close(final, hs[-1], atol=1e-5, msg="resid_post.last")
        if spec.logits is None:
            close(final, out.last_hidden_state, atol=1e-5)
            close(run.output, out.last_hidden_state, atol=1e-5)
    if spec.logits is not None:
        close(run.output, out.logits, atol=1e-5, msg="logits")


@pytest.mark.parametrize("arch", ARCHS)
def test_attention_patterns(arch):
    spec, model, m = build(arch)
    ids = ids_for(2)
    before = model.config._attn_implementation
    cache = m.capture(ids, ["attn_pattern.*", "head_out.*"])
    assert model.config._attn_implementation == before
    model.set_attn_implementation("eager")
    try:
        attentions = hf(model, ids, output_attentions=True).attentions
    finally:
        model.set_attn_implementation(before)
    above = torch.ones(T, T, dtype=torch.bool).triu(1)
    for l in range(N_LAYER):
        pattern = cache[f"attn_pattern.{l}"]
        assert pattern.shape == (2, N_HEAD, T, T)
        assert cache[f"head_out.{l}"].shape == (2, T, N_HEAD, 64)
        close(pattern.sum(-1), torch.ones(2, N_HEAD, T), atol=1e-5)
        assert (pattern >= 0).all()
        if spec.decoder:
            assert (pattern[..., above] == 0).all()
        else:
            assert (pattern[..., above] > 0).all()
        close(pattern, attentions[l], atol=1e-6, msg=f"attn_pattern.{l}")
        # heads sharing a key/value head still attend differently (their queries differ)
        assert not torch.allclose(pattern[:, 0], pattern[:, 1], atol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_heads_plus_bias_sum_to_attn_out(arch):
    spec, model, m = build(arch)
    cache = m.capture(ids_for(3), ["head_out.*", "attn_out.*"])
    for l, block in enumerate(blocks(spec, model)):
        o_proj = block.get_submodule(spec.o_proj)
        assert (o_proj.bias is not None) == spec.o_bias
        bias = 0 if o_proj.bias is None else o_proj.bias
        if spec.o_bias:
            assert o_proj.bias.abs().min() > 0
        close(cache[f"head_out.{l}"].sum(2) + bias, cache[f"attn_out.{l}"], atol=1e-5, msg=f"layer {l}")


def test_qwen2_has_qkv_bias_only():
    model = tiny_llama("qwen2")
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.bias is not None and attn.k_proj.bias is not None and attn.v_proj.bias is not None
    assert attn.o_proj.bias is None


@pytest.mark.parametrize("arch", ARCHS)
def test_block_arithmetic(arch):
    spec, model, m = build(arch)
    sites = [s for s in ALL_SITES if s in ("resid_pre.*", "attn_out.*", "mlp_act.*", "mlp_out.*", "resid_post.*")]
    if spec.block != "parallel":
        sites.append("resid_mid.*")
    c = m.capture(ids_for(4), sites)
    with torch.no_grad():
        for l, block in enumerate(blocks(spec, model)):
            pre, attn, mlp, post = (c[f"{f}.{l}"] for f in ("resid_pre", "attn_out", "mlp_out", "resid_post"))
            close(block.get_submodule(spec.mlp_down)(c[f"mlp_act.{l}"]), mlp, atol=1e-5, msg="mlp_out = down(mlp_act)")
            if spec.block == "pre":
                close(c[f"resid_mid.{l}"], pre + attn, atol=1e-6, msg="resid_mid")
                close(post, c[f"resid_mid.{l}"] + mlp, atol=1e-6, msg="resid_post")
            elif spec.block == "parallel":
                close(post, pre + attn + mlp, atol=1e-5, msg="resid_post")
            else:
                mid = c[f"resid_mid.{l}"]
                close(mid, block.attention.output.LayerNorm(pre + attn), atol=1e-5, msg="resid_mid")
                close(post, block.output.LayerNorm(mid + mlp), atol=1e-5, msg="resid_post")


# Writes ---------------------------------------------------------------------------------------------


def _sites(m):
    return [s for s in ALL_SITES if s.split(".")[0] in m.catalog]


@pytest.mark.parametrize("arch", ARCHS)
def test_self_patch_changes_nothing(arch):
    spec, model, m = build(arch)
    ids = ids_for(5)
    source = m.run(ids, capture=_sites(m))
    keys = m.capture_keys(_sites(m), m.prepare(ids))
    run = m.run(ids, {k: cp.Patch(source.cache) for k in keys}, capture=_sites(m))
    close(run.output, source.output, atol=0)
    for key in source.cache:
        close(run.cache[key], source.cache[key], atol=0, msg=key)
    # without attention patterns the implementation is never switched: equal to a plain forward
    plain = m.run(ids).output
    no_pattern = [s for s in _sites(m) if not s.startswith("attn_pattern")]
    src = m.capture(ids, no_pattern)
    run = m.run(ids, {k: cp.Patch(src) for k in m.capture_keys(no_pattern, m.prepare(ids))})
    close(run.output, plain, atol=0)


def _scale_head_columns(o_proj, head, factor):
    d_head = o_proj.in_features // N_HEAD

    def hook(module, args):
        z = args[0].clone()
        z[..., head * d_head : (head + 1) * d_head] *= factor
        return (z,)

    return o_proj.register_forward_pre_hook(hook)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("head", [1, 3])
def test_zero_head_equals_zeroing_o_proj_columns(arch, head):
    spec, model, m = build(arch)
    ids = ids_for(6)
    o_proj = blocks(spec, model)[1].get_submodule(spec.o_proj)
    handle = _scale_head_columns(o_proj, head, 0.0)
    try:
        by_hand = m.adapter.output(hf(model, ids))
    finally:
        handle.remove()
    clean = m.run(ids).output
    out = m.run(ids, {f"head_out.1[head={head}]": cp.Zero()}).output
    close(out, by_hand, atol=1e-5)
    assert not torch.allclose(out, clean, atol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("head,factor", [(2, 0.5), (3, 0.0)])
def test_pattern_edit_equals_scaling_the_heads_values(arch, head, factor):
    """pattern_h @ v is linear in the pattern: scaling query head h's pattern scales its slice of o_proj's input.

    Under grouped-query attention this checks that pattern heads are query heads, in o_proj's order.
    """
    spec, model, m = build(arch)
    ids = ids_for(7)
    o_proj = blocks(spec, model)[1].get_submodule(spec.o_proj)
    handle = _scale_head_columns(o_proj, head, factor)
    try:
        by_hand = m.adapter.output(hf(model, ids))
    finally:
        handle.remove()
    out = m.run(ids, {f"attn_pattern.1[head={head}]": cp.Scale(factor)}).output
    close(out, by_hand, atol=1e-5)
    assert not torch.allclose(out, m.run(ids).output, atol=1e-4)
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("arch", ARCHS)
def test_patch_resid_pre_respects_causality(arch):
    spec, model, m = build(arch)
    ids, other = ids_for(8), ids_for(9)
    p = 3
    clean = m.run(ids).output
    out = m.run(ids, {f"resid_pre.1[pos={p}]": cp.Patch(other)}).output
    if spec.logits == ("label",):  # one output per sequence
        assert not torch.allclose(out, clean, atol=1e-5)
        return
    if spec.decoder:  # causal: positions before p are exactly unchanged
        close(out[:, :p], clean[:, :p], atol=0)
    assert not torch.allclose(out[:, p], clean[:, p], atol=1e-4)
    if not spec.decoder:  # bidirectional: earlier positions see position p
        assert not torch.allclose(out[:, :p], clean[:, :p], atol=1e-5)
    # the source really was used: the patched residual is the other prompt's
    source = m.capture(other, "resid_pre.1")
    got = m.run(ids, {f"resid_pre.1[pos={p}]": cp.Patch(source)}, capture="resid_pre.1").cache["resid_pre.1"]
    close(got[:, p], source["resid_pre.1"][:, p], atol=0)


# Padding --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_llama], ids=["gpt2", "llama"])
def test_right_padding_leaves_real_tokens_unchanged(make):
    model = randomize(make())
    m = cp.wrap(model)
    sites = _sites(m)
    n = 5
    short = ids_for(10, rows=1, length=n)
    other = ids_for(11, rows=1, length=T)
    batch = {
        "input_ids": torch.cat([torch.cat([short, torch.zeros(1, T - n, dtype=torch.long)], 1), other]),
        "attention_mask": torch.tensor([[1] * n + [0] * (T - n), [1] * T]),
    }
    alone, padded, full = m.capture(short, sites), m.capture(batch, sites), m.capture(other, sites)
    for key in alone:
        got = padded[key][:1]
        if key.startswith("attn_pattern"):
            assert (got[..., :n, n:] == 0).all(), key  # real queries ignore the padding
            got = got[..., :n, :n]
        else:
            got = got[:, :n]
        close(got, alone[key], atol=1e-5, msg=key)
        close(padded[key][1:], full[key], atol=1e-5, msg=f"{key} (unpadded row)")


# Variants: sliding windows, explicit head_dim, an o_proj bias ------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: tiny_llama("mistral", sliding_window=3),
        lambda: tiny_llama("qwen2", use_sliding_window=True, sliding_window=3, max_window_layers=1),
        lambda: tiny_llama("llama", head_dim=8, attention_bias=True),
    ],
    ids=["mistral_window3", "qwen2_window3_layer1", "llama_head_dim8_bias"],
)
def test_llama_family_variants(make):
    model = randomize(make())
    m = cp.wrap(model)
    ids = ids_for(12)
    cache = m.capture(ids, ["attn_pattern.*", "head_out.*", "attn_out.*"])
    model.set_attn_implementation("eager")
    try:
        attentions = hf(model, ids, output_attentions=True).attentions
    finally:
        model.set_attn_implementation("sdpa")
    window = getattr(model.config, "sliding_window", None)
    for l, layer in enumerate(model.model.layers):
        pattern = cache[f"attn_pattern.{l}"]
        close(pattern, attentions[l], atol=1e-6, msg=f"attn_pattern.{l}")
        attn = layer.self_attn
        if getattr(attn, "sliding_window", None) or (model.config.model_type == "mistral" and window):
            far = torch.ones(T, T, dtype=torch.bool).tril(-window)  # keys at least `window` behind the query
            assert (pattern[..., far] == 0).all()
        bias = 0 if attn.o_proj.bias is None else attn.o_proj.bias
        assert cache[f"head_out.{l}"].shape == (2, T, N_HEAD, 64)
        close(cache[f"head_out.{l}"].sum(2) + bias, cache[f"attn_out.{l}"], atol=1e-5)
    if model.config.model_type == "qwen2":  # max_window_layers=1: layer 0 sees every key, layer 1 slides
        assert [layer.self_attn.sliding_window for layer in model.model.layers] == [None, 3]
        assert (cache["attn_pattern.0"][..., torch.ones(T, T, dtype=torch.bool).tril(-3)] > 0).all()
