"""GPT-2 sites checked against the hand-written reference forward (reads and writes) and hand-made hooks."""

from __future__ import annotations

import pytest
import torch

import crosspatch as cp
from conftest import randomize, tiny_gpt2
from reference_gpt2 import _ACTIVATIONS, _layer_norm, gpt2_reference

FAMILIES = ["embed", "resid_pre", "attn_pattern", "head_z", "head_out", "attn_out", "resid_mid", "mlp_act", "mlp_out", "resid_post", "logits"]
ALL_SITES = [f if f in ("embed", "logits") else f"{f}.*" for f in FAMILIES]
N_LAYER, N_HEAD, D_HEAD, T = 2, 4, 16, 10
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def peaked(model: torch.nn.Module) -> torch.nn.Module:
    """Sharper attention patterns, so that pattern edits matter."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("c_attn.weight"):
                p.mul_(8)
    return model


def make(dtype=torch.float32, **overrides):
    return peaked(randomize(tiny_gpt2(**overrides))).to(dtype)


def ids_for(seed: int, rows: int = 3, length: int = T) -> torch.Tensor:
    return torch.randint(2, 100, (rows, length), generator=torch.Generator().manual_seed(seed))


def edited_reference(model, input_ids, edits=None):
    """The reference forward of reference_gpt2.py with an edit hook at every site.

    ``edits`` maps a site key ("head_out.1", "logits") to a function of the (cloned) activation that
    returns the edited one; everything downstream is recomputed from it.
    """
    edits = edits or {}

    def at(key, value):
        fn = edits.get(key)
        return value if fn is None else fn(value.clone())

    cfg, tr = model.config, model.transformer
    eps, act = cfg.layer_norm_epsilon, _ACTIVATIONS[cfg.activation_function]
    B, T_ = input_ids.shape
    H, D = cfg.n_head, cfg.n_embd
    Dh = D // H
    causal = torch.ones(T_, T_, dtype=torch.bool).tril()
    out = {}
    with torch.no_grad():
        x = at("embed", tr.wte.weight[input_ids] + tr.wpe.weight[torch.arange(T_)])
        out["embed"] = x
        for l, block in enumerate(tr.h):
            x = at(f"resid_pre.{l}", x)
            out[f"resid_pre.{l}"] = x
            attn = block.attn
            h = _layer_norm(x, block.ln_1, eps)
            qkv = h @ attn.c_attn.weight + attn.c_attn.bias
            q, k, v = (t.view(B, T_, H, Dh).transpose(1, 2) for t in qkv.split(D, dim=-1))
            scale = Dh**-0.5 if cfg.scale_attn_weights else 1.0
            if cfg.scale_attn_by_inverse_layer_idx:
                scale /= float(l + 1)
            scores = ((q @ k.transpose(-1, -2)) * scale).masked_fill(~causal, float("-inf"))
            pattern = at(f"attn_pattern.{l}", scores.softmax(dim=-1))
            out[f"attn_pattern.{l}"] = pattern
            z = at(f"head_z.{l}", (pattern @ v).transpose(1, 2))
            out[f"head_z.{l}"] = z
            head_out = at(f"head_out.{l}", torch.einsum("bthe,hed->bthd", z, attn.c_proj.weight.view(H, Dh, D)))
            out[f"head_out.{l}"] = head_out
            attn_out = at(f"attn_out.{l}", head_out.sum(2) + attn.c_proj.bias)
            out[f"attn_out.{l}"] = attn_out
            x = at(f"resid_mid.{l}", x + attn_out)
            out[f"resid_mid.{l}"] = x
            h = _layer_norm(x, block.ln_2, eps)
            mlp_act = at(f"mlp_act.{l}", act(h @ block.mlp.c_fc.weight + block.mlp.c_fc.bias))
            out[f"mlp_act.{l}"] = mlp_act
            mlp_out = at(f"mlp_out.{l}", mlp_act @ block.mlp.c_proj.weight + block.mlp.c_proj.bias)
            out[f"mlp_out.{l}"] = mlp_out
            x = at(f"resid_post.{l}", x + mlp_out)
            out[f"resid_post.{l}"] = x
        out["logits"] = at("logits", _layer_norm(x, tr.ln_f, eps) @ model.lm_head.weight.T)
    return out


def assert_matches(cache, ref, atol, keys=None):
    for key in keys or ref:
        assert cache[key].dtype == ref[key].dtype, key
        assert cache[key].shape == ref[key].shape, key
        torch.testing.assert_close(cache[key], ref[key], atol=atol, rtol=0, msg=lambda m: f"{key}: {m}")


# Reads ---------------------------------------------------------------------------------------------


def test_randomized_parameters_are_not_trivial():
    model = make()
    for block in model.transformer.h:
        for module in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj, block.ln_1, block.ln_2):
            assert module.bias.abs().min() > 0
        assert not torch.allclose(block.ln_1.weight, torch.ones_like(block.ln_1.weight))


@pytest.mark.parametrize(
    "config",
    [{}, {"scale_attn_by_inverse_layer_idx": True}, {"scale_attn_weights": False}, {"reorder_and_upcast_attn": True}],
    ids=["default", "scale_by_layer", "unscaled", "reorder_upcast"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_site_matches_reference(dtype, config):
    model = make(dtype, **config)
    ids = ids_for(1)
    cache = cp.wrap(model).capture(ids, ALL_SITES)
    ref = gpt2_reference(model, ids)
    assert set(cache) == set(ref)
    assert_matches(cache, ref, TOL[dtype])


def test_edited_reference_without_edits_is_the_reference():
    model = make()
    ids = ids_for(1)
    ref, mine = gpt2_reference(model, ids), edited_reference(model, ids)
    assert_matches(mine, ref, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_captured_alone(family):
    """A family captured on its own (no pattern switch elsewhere) still matches the reference."""
    model = make()
    ids = ids_for(4)
    site = family if family in ("embed", "logits") else f"{family}.*"
    cache = cp.wrap(model).capture(ids, site)
    ref = gpt2_reference(model, ids)
    keys = [k for k in ref if k.split(".")[0] == family]
    assert sorted(cache) == sorted(keys)
    assert_matches(cache, ref, 1e-5, keys)


@pytest.mark.parametrize("layer", range(N_LAYER))
def test_heads_plus_bias_sum_to_attn_out(layer):
    model = make()
    bias = model.transformer.h[layer].attn.c_proj.bias
    assert bias.abs().min() > 0
    cache = cp.wrap(model).capture(ids_for(5), [f"head_out.{layer}", f"attn_out.{layer}"])
    heads = cache[f"head_out.{layer}"]
    assert heads.shape == (3, T, N_HEAD, 64)
    torch.testing.assert_close(heads.sum(2) + bias, cache[f"attn_out.{layer}"], atol=1e-5, rtol=0)
    # Without the bias the sum is off by exactly that bias: head_out excludes it.
    assert not torch.allclose(heads.sum(2), cache[f"attn_out.{layer}"], atol=1e-3)


# Writes against the edited reference -------------------------------------------------------------


def _uniform_causal(rows, heads, t, dtype):
    tri = torch.ones(t, t, dtype=dtype).tril()
    return (tri / tri.sum(-1, keepdim=True)).expand(rows, heads, t, t).clone()


def _set(index, value):
    def fn(v):
        v[index] = value if not callable(value) else value(v[index])
        return v

    return fn


def _write_cases(dtype):
    """(site, intervention, edits) triples; ``src`` / ``src_ref`` are the source input's cache / reference."""
    vector = torch.linspace(-1, 1, 64, dtype=dtype)
    crafted = cp.Cache(
        {"attn_pattern.1": _uniform_causal(1, N_HEAD, T, dtype)}, {"attn_pattern.1": ("head", "pos", "key_pos")}
    )
    return [
        ("head_out.1[head=2]", lambda src: cp.Zero(), lambda sr: {"head_out.1": _set((slice(None), slice(None), 2), 0.0)}),
        (
            "resid_mid.0[pos=4]",
            lambda src: cp.Patch(src),
            lambda sr: {"resid_mid.0": _set((slice(None), 4), sr["resid_mid.0"][:, 4])},
        ),
        (
            "mlp_act.1[neuron={3,7}]",
            lambda src: cp.Zero(),
            lambda sr: {"mlp_act.1": _set((slice(None), slice(None), [3, 7]), 0.0)},
        ),
        (
            "attn_pattern.0[head=1]",
            lambda src: cp.Scale(0.5),
            lambda sr: {"attn_pattern.0": _set((slice(None), 1), lambda p: 0.5 * p)},
        ),
        (
            "attn_pattern.1[head=3]",
            lambda src: cp.Patch(crafted),
            lambda sr: {"attn_pattern.1": _set((slice(None), 3), _uniform_causal(3, N_HEAD, T, dtype)[:, 3])},
        ),
        (
            "resid_pre.1[pos=2]",
            lambda src: cp.Add(vector, alpha=2.0),
            lambda sr: {"resid_pre.1": _set((slice(None), 2), lambda x: x + 2.0 * vector)},
        ),
        ("embed[pos=0:3]", lambda src: cp.Zero(), lambda sr: {"embed": _set((slice(None), slice(0, 3)), 0.0)}),
        (
            "attn_out.0[pos=5]",
            lambda src: cp.Scale(-1.0),
            lambda sr: {"attn_out.0": _set((slice(None), 5), lambda x: -x)},
        ),
        ("mlp_out.1", lambda src: cp.Patch(src), lambda sr: {"mlp_out.1": lambda v: sr["mlp_out.1"].clone()}),
        (
            "resid_post.0[pos={1,6}]",
            lambda src: cp.Patch(src),
            lambda sr: {"resid_post.0": _set((slice(None), [1, 6]), sr["resid_post.0"][:, [1, 6]])},
        ),
        (
            "head_out.0[pos=7,head={0,3}]",
            lambda src: cp.Patch(src),
            lambda sr: {"head_out.0": _set((slice(None), 7, [0, 3]), sr["head_out.0"][:, 7, [0, 3]])},
        ),
        (
            "head_z.1[pos=3,head=1]",
            lambda src: cp.Patch(src),
            lambda sr: {"head_z.1": _set((slice(None), 3, 1), sr["head_z.1"][:, 3, 1])},
        ),
        ("logits[pos=-1]", lambda src: cp.Scale(2.0), lambda sr: {"logits": _set((slice(None), -1), lambda x: 2 * x)}),
    ]


CASE_IDS = [c[0] for c in _write_cases(torch.float32)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", range(len(CASE_IDS)), ids=CASE_IDS)
def test_write_matches_edited_reference(case, dtype):
    site, intervention, edits = _write_cases(dtype)[case]
    model = make(dtype)
    m = cp.wrap(model)
    ids, src_ids = ids_for(1), ids_for(7)
    src_cache = m.capture(src_ids, ALL_SITES)
    src_ref = gpt2_reference(model, src_ids)

    run = m.run(ids, {site: intervention(src_cache)}, capture=ALL_SITES)
    expected = edited_reference(model, ids, edits(src_ref))
    assert_matches(run.cache, expected, TOL[dtype])
    torch.testing.assert_close(run.output, expected["logits"], atol=TOL[dtype], rtol=0)
    # The edit matters: the unedited reference is measurably different somewhere.
    clean = gpt2_reference(model, ids)
    key = cp.Site.parse(site).key
    assert not torch.allclose(clean[key], expected[key], atol=1e-3)


def test_patch_from_inputs_equals_patch_from_cache():
    model = make()
    m = cp.wrap(model)
    ids, src_ids = ids_for(1), ids_for(7)
    by_inputs = m.run(ids, {"resid_mid.0[pos=4]": cp.Patch(src_ids)}).output
    by_cache = m.run(ids, {"resid_mid.0[pos=4]": cp.Patch(m.capture(src_ids, "resid_mid.0"))}).output
    torch.testing.assert_close(by_inputs, by_cache, atol=0, rtol=0)


# Writes against hand-made hooks on the raw modules -----------------------------------------------


def _no_hooks_left(model):
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks, type(module).__name__


def _hooked_logits(model, ids, module, hook, pre=False, with_kwargs=False):
    register = module.register_forward_pre_hook if pre else module.register_forward_hook
    handle = register(hook, with_kwargs=with_kwargs)
    try:
        with torch.no_grad():
            return model(ids).logits
    finally:
        handle.remove()


def test_zero_head_equals_zeroing_its_c_proj_columns():
    model = make()
    m = cp.wrap(model)
    ids = ids_for(1)
    head = 2

    def zero_head(module, args):
        z = args[0].clone()
        z[..., head * D_HEAD : (head + 1) * D_HEAD] = 0
        return (z,)

    by_hand = _hooked_logits(model, ids, model.transformer.h[1].attn.c_proj, zero_head, pre=True)
    out = m.run(ids, {f"head_out.1[head={head}]": cp.Zero()}).output
    torch.testing.assert_close(out, by_hand, atol=1e-5, rtol=0)
    assert not torch.allclose(out, m.run(ids).output, atol=1e-3)
    _no_hooks_left(model)


def test_patch_resid_mid_equals_hand_hooks():
    model = make()
    m = cp.wrap(model)
    ids, src_ids = ids_for(1), ids_for(7)
    block = model.transformer.h[0]
    stash = {}

    def remember_input(module, args, kwargs):
        stash["x"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    def record_mid(module, args, output):
        stash["mid"] = stash["x"] + output[0]

    def write_mid(module, args, output):
        a = output[0].clone()
        a[:, 4] = stash["src_mid"][:, 4] - stash["x"][:, 4]
        return (a, *output[1:])

    handles = [block.register_forward_pre_hook(remember_input, with_kwargs=True), block.attn.register_forward_hook(record_mid)]
    with torch.no_grad():
        model(src_ids)
    for h in handles:
        h.remove()
    stash["src_mid"] = stash.pop("mid")
    handles = [block.register_forward_pre_hook(remember_input, with_kwargs=True), block.attn.register_forward_hook(write_mid)]
    try:
        with torch.no_grad():
            by_hand = model(ids).logits
    finally:
        for h in handles:
            h.remove()

    src = m.capture(src_ids, "resid_mid.0")
    torch.testing.assert_close(src["resid_mid.0"], stash["src_mid"], atol=0, rtol=0)
    run = m.run(ids, {"resid_mid.0[pos=4]": cp.Patch(src)}, capture=["resid_mid.0", "resid_pre.0"])
    torch.testing.assert_close(run.output, by_hand, atol=1e-5, rtol=0)
    clean = m.capture(ids, ["resid_mid.0", "resid_pre.0"])
    torch.testing.assert_close(run.cache["resid_mid.0"][:, 4], src["resid_mid.0"][:, 4], atol=1e-6, rtol=0)
    keep = [p for p in range(T) if p != 4]
    torch.testing.assert_close(run.cache["resid_mid.0"][:, keep], clean["resid_mid.0"][:, keep], atol=0, rtol=0)
    torch.testing.assert_close(run.cache["resid_pre.0"], clean["resid_pre.0"], atol=0, rtol=0)
    _no_hooks_left(model)


def test_zero_neurons_equals_zeroing_c_proj_inputs():
    model = make()
    m = cp.wrap(model)
    ids = ids_for(1)

    def zero_neurons(module, args):
        x = args[0].clone()
        x[..., [3, 7]] = 0
        return (x,)

    by_hand = _hooked_logits(model, ids, model.transformer.h[1].mlp.c_proj, zero_neurons, pre=True)
    out = m.run(ids, {"mlp_act.1[neuron={3,7}]": cp.Zero()}).output
    torch.testing.assert_close(out, by_hand, atol=0, rtol=0)  # the same computation, op for op
    assert not torch.allclose(out, m.run(ids).output, atol=1e-4)
    _no_hooks_left(model)


def _eager_attention_hook(edit_pattern):
    """A forward hook on GPT2Attention that recomputes its output by hand with an edited pattern."""

    def hook(module, args, kwargs, output):
        h = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        B, T_, D = h.shape
        H = module.num_heads
        Dh = D // H
        q, k, v = (t.view(B, T_, H, Dh).transpose(1, 2) for t in (h @ module.c_attn.weight + module.c_attn.bias).split(D, -1))
        scores = (q @ k.transpose(-1, -2)) * Dh**-0.5
        scores = scores.masked_fill(~torch.ones(T_, T_, dtype=torch.bool).tril(), float("-inf"))
        pattern = edit_pattern(scores.softmax(-1))
        z = (pattern @ v).transpose(1, 2).reshape(B, T_, D)
        return (z @ module.c_proj.weight + module.c_proj.bias, pattern)

    return hook


@pytest.mark.parametrize("kind", ["scale", "uniform"])
def test_pattern_edit_equals_hand_eager_attention(kind):
    model = make()
    m = cp.wrap(model)
    ids = ids_for(1)
    uniform = _uniform_causal(1, N_HEAD, T, torch.float32)

    def edit(p):
        p = p.clone()
        p[:, 1] = 0.5 * p[:, 1] if kind == "scale" else uniform[:, 1]
        return p

    by_hand = _hooked_logits(model, ids, model.transformer.h[0].attn, _eager_attention_hook(edit), with_kwargs=True)
    unedited = _hooked_logits(model, ids, model.transformer.h[0].attn, _eager_attention_hook(lambda p: p), with_kwargs=True)
    torch.testing.assert_close(unedited, m.run(ids).output, atol=1e-5, rtol=0)  # the hand hook is faithful

    if kind == "scale":
        intervention = cp.Scale(0.5)
    else:
        intervention = cp.Patch(cp.Cache({"attn_pattern.0": uniform}, {"attn_pattern.0": ("head", "pos", "key_pos")}))
    run = m.run(ids, {"attn_pattern.0[head=1]": intervention}, capture="attn_pattern.0")
    torch.testing.assert_close(run.output, by_hand, atol=1e-5, rtol=0)
    assert not torch.allclose(run.output, unedited, atol=1e-3)
    if kind == "uniform":
        torch.testing.assert_close(run.cache["attn_pattern.0"][:, 1], uniform[:, 1].expand(3, T, T), atol=0, rtol=0)
    _no_hooks_left(model)


# Self-patch and the attention-implementation switch ---------------------------------------------


def _writable_keys(m, inputs):
    return [k for k in m.capture_keys(ALL_SITES, m.prepare(inputs)) if m.catalog.family(cp.Site.parse(k).family).writable]


def test_self_patch_of_every_site_changes_nothing():
    model = make()
    m = cp.wrap(model)
    ids = ids_for(1)
    source = m.run(ids, capture=ALL_SITES)
    keys = _writable_keys(m, ids)
    assert len(keys) == 2 + 9 * N_LAYER
    run = m.run(ids, {k: cp.Patch(source.cache) for k in keys}, capture=ALL_SITES)
    torch.testing.assert_close(run.output, source.output, atol=0, rtol=0)
    for key in source.cache:
        torch.testing.assert_close(run.cache[key], source.cache[key], atol=0, rtol=0, msg=key)


def test_self_patch_per_head_and_per_position_changes_nothing():
    model = make()
    m = cp.wrap(model)
    ids = ids_for(1)
    sites = ["head_out.*[head=*]", "resid_pre.*[pos=*]", "attn_pattern.*[head=*]"]
    source = m.run(ids, capture=sites)
    concrete = [s for p in sites for s in m.catalog.expand(p, {"pos": T}).sites]
    run = m.run(ids, {str(s): cp.Patch(source.cache) for s in concrete})
    torch.testing.assert_close(run.output, source.output, atol=0, rtol=0)


def test_self_patch_without_patterns_equals_plain_run():
    model = make()
    m = cp.wrap(model)
    ids = ids_for(1)
    sites = [s for s in ALL_SITES if not s.startswith("attn_pattern")]
    plain = m.run(ids)
    source = m.capture(ids, sites)
    run = m.run(ids, {k: cp.Patch(source) for k in _writable_keys(m, ids) if not k.startswith("attn_pattern")})
    torch.testing.assert_close(run.output, plain.output, atol=0, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(run.output, model(ids).logits, atol=0, rtol=0)


class _Spy(cp.Intervention):
    """Records the attention implementation while the forward runs; optionally raises."""

    kind = "spy_for_tests"

    def __init__(self, config, fail=False):
        self.config, self.fail, self.seen = config, fail, []

    def apply(self, x, ctx):
        self.seen.append(self.config._attn_implementation)
        if self.fail:
            raise RuntimeError("boom inside the forward")
        return x


@pytest.mark.parametrize("initial", ["sdpa", "eager"])
def test_attn_implementation_restored(initial):
    model = make()
    model.set_attn_implementation(initial)
    m = cp.wrap(model)
    ids = ids_for(1)
    spy = _Spy(model.config)
    cache = m.run(ids, {"attn_pattern.1[head=0]": spy}, capture="attn_pattern.0").cache
    assert spy.seen and spy.seen[0] != initial  # switched during the run
    assert model.config._attn_implementation == initial
    m.run(ids, {"attn_pattern.0": cp.Patch(cache)})
    assert model.config._attn_implementation == initial
    m.run(ids, {"attn_pattern.0": cp.Patch(ids_for(9))})  # source run nested inside the run
    assert model.config._attn_implementation == initial
    _no_hooks_left(model)


@pytest.mark.parametrize("where", ["attn_pattern.0[head=1]", "head_out.1[head=0]", "logits"])
def test_attn_implementation_restored_after_exception(where):
    model = make()
    m = cp.wrap(model)
    ids = ids_for(1)
    before = m.run(ids).output
    with pytest.raises(RuntimeError, match="boom"):
        m.run(ids, {where: _Spy(model.config, fail=True)}, capture=["attn_pattern.*", "resid_post.0"])
    assert model.config._attn_implementation == "sdpa"
    _no_hooks_left(model)
    torch.testing.assert_close(m.run(ids).output, before, atol=0, rtol=0)
    # a pattern source of the wrong length fails inside the forward too
    bad = cp.Cache({"attn_pattern.0": torch.ones(1, N_HEAD, T - 1, T - 1)}, {"attn_pattern.0": ("head", "pos", "key_pos")})
    with pytest.raises(cp.SiteError):
        m.run(ids, {"attn_pattern.0": cp.Patch(bad)})
    assert model.config._attn_implementation == "sdpa"
    _no_hooks_left(model)
    # the forward fails before any attention layer runs (token id outside the vocabulary)
    with pytest.raises(IndexError):
        m.run(torch.full((1, T), 500), capture="attn_pattern.*")
    assert model.config._attn_implementation == "sdpa"
    _no_hooks_left(model)


# Unsupported models -------------------------------------------------------------------------------

SUPPORTED = ["gpt2", "gpt_neox", "llama", "mistral", "qwen2", "bert", "roberta"]


def _switch_transformers():  # T5 with mixture-of-experts MLPs (T5 itself is served: test_seq2seq.py)
    from transformers import SwitchTransformersConfig, SwitchTransformersForConditionalGeneration

    config = SwitchTransformersConfig(d_model=32, d_ff=64, d_kv=16, num_layers=1, num_decoder_layers=1, num_heads=2,
                                      vocab_size=50, num_experts=2)
    return SwitchTransformersForConditionalGeneration(config)


def _jetmoe():  # its attention writes through a mixture of output experts: no one output projection
    from crosspatch.adapters.transformers.tiny import tiny_model

    return tiny_model("jetmoe")


# GPT-J and OPT are served by inference now (tests/adapters/transformers/test_inferred.py).
@pytest.mark.parametrize("build,cls", [(_switch_transformers, "SwitchTransformersForConditionalGeneration"),
                                       (_jetmoe, "JetMoeForCausalLM")])
def test_unsupported_model_raises_adapter_error(build, cls):
    model = build().eval()
    with pytest.raises(cp.AdapterError) as err:
        cp.wrap(model, "transformers").sites()
    message = str(err.value)
    assert cls in message
    for model_type in SUPPORTED:
        assert model_type in message
    # Not named, the model is served at module level by the fallback adapter, with the reason as a warning.
    with pytest.warns(UserWarning, match=cls):
        assert cp.wrap(model).adapter.name == "generic"