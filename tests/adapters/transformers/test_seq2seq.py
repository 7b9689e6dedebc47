"""Encoder-decoder models (crosspatch.adapters.transformers.seq2seq): T5 and BART and the types sharing their
layouts, on tiny random models, against transformers' own hidden states and attentions, hand-written hooks
and the conformance suite."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import crosspatch as cp
from conftest import randomize
from crosspatch.adapters.transformers import seq2seq
from crosspatch.adapters.transformers.adapter import TransformersAdapter
from crosspatch.adapters.transformers.tiny import tiny_model
from crosspatch.testing import check_adapter

STACK = ("embed", "resid_pre", "attn_pattern", "head_z", "head_out", "attn_out", "resid_mid", "mlp_act", "mlp_out",
         "resid_post")
CROSS = ("cross_pattern", "cross_head_z", "cross_head_out", "cross_attn_out", "resid_cross")
TYPES = sorted(seq2seq.LAYOUTS)
LAYOUT_KINDS = ("t5", "bart", "pegasus")  # pre-norm in sublayers, post-norm, pre-norm (BART-style modules)


def model_of(model_type: str):
    # BART-style weights start at std 0.02, where one source position barely moves the logits: larger ones.
    larger = {} if model_type.endswith("t5") else {"init_std": 0.2}
    return randomize(tiny_model(model_type, "seq2seq-lm", **larger))


def inputs(seed: int = 0, source: int = 9, target: int = 6, pad: bool = False) -> dict[str, torch.Tensor]:
    """Two rows of source and target ids; with ``pad`` the first row's source and the second row's target
    end in padding."""
    g = torch.Generator().manual_seed(seed)
    out = {"input_ids": torch.randint(3, 100, (2, source), generator=g),
           "decoder_input_ids": torch.randint(3, 100, (2, target), generator=g)}
    if pad:
        out["attention_mask"] = torch.ones(2, source, dtype=torch.long)
        out["attention_mask"][0, -3:] = 0
        out["decoder_attention_mask"] = torch.ones(2, target, dtype=torch.long)
        out["decoder_attention_mask"][1, -2:] = 0
    return out


def blocks(model, stack: str):
    layout = seq2seq.stack_layout(model, stack)
    return model.base_model.get_submodule(f"{stack}.{layout.blocks}"), layout


def test_families_and_axes():
    m = cp.wrap(model_of("t5"))
    names = [f.name for f in m.sites()]
    assert names == [f"encoder.{f}" for f in STACK] + [f"decoder.{f}" for f in STACK[:7] + CROSS + STACK[7:]] + ["logits"]
    axes = {f.name: f.axis_names for f in m.sites()}
    assert axes["encoder.resid_pre"] == ("enc_pos", "dim")
    assert axes["encoder.attn_pattern"] == ("head", "enc_pos", "enc_key_pos")
    assert axes["decoder.attn_pattern"] == ("head", "pos", "key_pos")
    assert axes["decoder.cross_pattern"] == ("head", "pos", "enc_pos")
    assert axes["logits"] == ("pos", "vocab")
    assert m.adapter.sizes(m.prepare(inputs())) == {"enc_pos": 9, "enc_key_pos": 9, "pos": 6, "key_pos": 6}
    sweep = m.catalog.expand("encoder.resid_pre.*[enc_pos=*]", m.adapter.sizes(m.prepare(inputs())))
    assert sweep.shape == (2, 9)
    assert m.describe()["encoder"] == {"n_layers": 2, "n_heads": 4, "d_model": 64}


def test_bart_without_an_lm_head_has_no_logits_family():
    from transformers import BartModel

    model = BartModel(tiny_model("bart", "seq2seq-lm").config).eval()
    m = cp.wrap(model)
    assert "logits" not in m.catalog and "decoder.cross_head_out" in m.catalog
    assert m.run(inputs()).output.shape == (2, 6, 64)  # the decoder's last hidden state


def test_inputs_need_the_decoder_ids_and_keep_transformers_names():
    m = cp.wrap(model_of("t5"))
    with pytest.raises(ValueError, match="decoder_input_ids"):
        m.prepare(inputs()["input_ids"])
    with pytest.raises(ValueError, match="decoder_input_ids"):
        m.prepare({"input_ids": inputs()["input_ids"]})
    with pytest.raises(ValueError, match="unknown inputs"):
        m.prepare({**inputs(), "labels": inputs()["decoder_input_ids"]})
    raw = inputs(pad=True)
    prepared = m.prepare(raw)
    # Prepared keys run along the positions they are named for: unprefixed ones along the decoder's `pos`.
    assert torch.equal(prepared["input_ids"], raw["decoder_input_ids"])
    assert torch.equal(prepared["attention_mask"], raw["decoder_attention_mask"])
    assert torch.equal(prepared["encoder_input_ids"], raw["input_ids"])
    assert torch.equal(prepared["encoder_attention_mask"], raw["attention_mask"])
    again = m.prepare(prepared)
    assert again.keys() == prepared.keys() and all(torch.equal(again[k], prepared[k]) for k in again)


def test_the_decoders_last_real_token_is_what_pos_last_and_last_position_metrics_read():
    model = model_of("bart")
    m = cp.wrap(model)
    x = inputs(pad=True)
    metric = cp.metrics.logit_diff(5, 6)  # pos=-1: each row's last real token
    out = m.run(x).output
    got = metric(out, cp.metrics.MetricContext(torch.arange(2), None, m.prepare(x)["attention_mask"]))
    with torch.no_grad():
        logits = model(**x).logits
    last = [5, 3]  # row 1's target ends in two padding positions
    expected = torch.stack([logits[r, last[r], 5] - logits[r, last[r], 6] for r in range(2)])
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    # The engine's pos=last reads the same mask.
    cache = m.capture(x, ["decoder.resid_post.1", "decoder.resid_post.1[pos=last]"])
    whole = cache["decoder.resid_post.1"]
    torch.testing.assert_close(cache["decoder.resid_post.1[pos=last]"].squeeze(1), whole[[0, 1], last], atol=0, rtol=0)


@pytest.mark.parametrize("model_type", LAYOUT_KINDS + ("mt5", "marian"))
def test_conformance_suite_passes(model_type):
    # Reading patterns runs the eager attention, which differs from sdpa by float rounding: ~1e-5 on mT5's
    # logits, which reach 40 here.
    atol = 1e-4 if model_type == "mt5" else 1e-5
    report = check_adapter(model_of(model_type), inputs(pad=True), "transformers", atol=atol, cuda=False)
    assert not report.failures, str(report)


@pytest.mark.parametrize("model_type", TYPES)
def test_every_family_is_exact_against_transformers(model_type):
    """The adapter's own oracles (crosspatch verify): hidden states, eager attentions, block arithmetic."""
    oracles = TransformersAdapter().family_oracles(model_of(model_type))
    assert set(oracles) == {f.name for f in cp.wrap(model_of(model_type)).sites()}
    for family, (error, failure) in oracles.items():
        assert failure is None and error <= 1e-5, (family, error, failure)


def test_the_oracles_catch_a_pattern_without_t5s_position_bias(monkeypatch):
    model = model_of("t5")
    wrong = tuple(dataclasses.replace(s, relative_bias=False) for s in seq2seq.LAYOUTS["t5"])
    monkeypatch.setitem(seq2seq.LAYOUTS, "t5", wrong)
    oracles = TransformersAdapter().family_oracles(model)
    for family in ("encoder.attn_pattern", "decoder.attn_pattern"):
        assert "not transformers' pattern" in oracles[family][1]
    assert oracles["encoder.resid_pre"][1] is None  # read without the pattern's eager attention


def test_verify_config_builds_the_encoder_decoder_model():
    assert type(TransformersAdapter().tiny_model("bart")).__name__ == "BartForConditionalGeneration"
    assert type(TransformersAdapter().tiny_model("t5")).__name__ == "T5ForConditionalGeneration"


@pytest.mark.parametrize("model_type", LAYOUT_KINDS)
def test_residual_streams_equal_transformers_hidden_states(model_type):
    model = model_of(model_type)
    m = cp.wrap(model)
    x = inputs(1, pad=True)
    cache = m.capture(x, ["encoder.resid_pre.*", "decoder.resid_pre.*", "encoder.resid_post.*", "decoder.resid_post.*"])
    with torch.no_grad():
        out = model(**x, output_hidden_states=True)
    for stack, hidden in (("encoder", out.encoder_hidden_states), ("decoder", out.decoder_hidden_states)):
        n = len(hidden) - 1
        for layer in range(n):
            torch.testing.assert_close(cache[f"{stack}.resid_pre.{layer}"], hidden[layer], atol=0, rtol=0)
        for layer in range(n - 1):
            torch.testing.assert_close(cache[f"{stack}.resid_post.{layer}"], hidden[layer + 1], atol=0, rtol=0)


@pytest.mark.parametrize("model_type", LAYOUT_KINDS)
def test_patterns_equal_transformers_eager_attentions_with_padding(model_type):
    model = model_of(model_type)
    m = cp.wrap(model)
    x = inputs(2, pad=True)
    cache = m.capture(x, ["encoder.attn_pattern.*", "decoder.attn_pattern.*", "decoder.cross_pattern.*"])
    configs = {id(mod.config): mod.config for mod in model.modules() if hasattr(mod, "config")}
    before = {k: c._attn_implementation for k, c in configs.items()}
    assert set(before.values()) == {"sdpa"}  # the run put the model's own attention back
    try:
        for c in configs.values():
            c._attn_implementation = "eager"
        with torch.no_grad():
            out = model(**x, output_attentions=True)
    finally:
        for k, c in configs.items():
            c._attn_implementation = before[k]
    for name, expected in (("encoder.attn_pattern", out.encoder_attentions), ("decoder.attn_pattern", out.decoder_attentions),
                           ("decoder.cross_pattern", out.cross_attentions)):
        for layer, pattern in enumerate(expected):
            torch.testing.assert_close(cache[f"{name}.{layer}"], pattern, atol=1e-6, rtol=0)
    assert torch.all(cache["decoder.attn_pattern.0"].triu(1) == 0)
    assert torch.all(cache["decoder.cross_pattern.0"][0, :, :, -3:] == 0)  # row 0's padded source


@pytest.mark.parametrize("model_type", LAYOUT_KINDS)
def test_heads_and_bias_sum_to_the_output_projection(model_type):
    """Against raw hooks on the output projections: each head's write plus the bias is what they return."""
    model = model_of(model_type)
    m = cp.wrap(model)
    x = inputs(3, pad=True)
    raw, handles = {}, []
    for stack in ("encoder", "decoder"):
        layers, layout = blocks(model, stack)
        for kind, path in (("", layout.o_proj), ("cross_", layout.cross_o)):
            if path is None:
                continue
            for layer, block in enumerate(layers):
                def keep(module, args, output, key=f"{stack}.{kind}{layer}"):
                    raw[key] = (args[0].detach(), output.detach())

                handles.append(block.get_submodule(path).register_forward_hook(keep))
    try:
        with torch.no_grad():
            model(**x)
    finally:
        for handle in handles:
            handle.remove()
    patterns = ["encoder.head_out.*", "encoder.head_z.*", "decoder.head_out.*", "decoder.head_z.*",
                "decoder.cross_head_out.*", "decoder.cross_head_z.*"]
    cache = m.capture(x, patterns)
    for key, (z, o) in raw.items():
        stack, rest = key.split(".")
        kind, layer = ("cross_", rest[6:]) if rest.startswith("cross_") else ("", rest)
        layers, layout = blocks(model, stack)
        bias = layers[int(layer)].get_submodule(layout.cross_o if kind else layout.o_proj).bias
        heads = cache[f"{stack}.{kind}head_out.{layer}"]
        torch.testing.assert_close(heads.sum(dim=2) + (0 if bias is None else bias), o, atol=1e-5, rtol=0)
        torch.testing.assert_close(cache[f"{stack}.{kind}head_z.{layer}"].flatten(-2), z, atol=0, rtol=0)


@pytest.mark.parametrize("model_type", LAYOUT_KINDS)
def test_zeroing_one_cross_attention_head_equals_a_hook_on_its_output_projection(model_type):
    model = model_of(model_type)
    m = cp.wrap(model)
    x = inputs(4)
    layers, layout = blocks(model, "decoder")
    d_head = m.catalog.family("decoder.cross_head_z").axis("d_head").size

    def zero_head(module, args):
        z = args[0].clone()
        z[..., 2 * d_head:3 * d_head] = 0
        return (z, *args[1:])

    got = m.run(x, {"decoder.cross_head_out.1[head=2]": cp.Zero()}).output
    handle = layers[1].get_submodule(layout.cross_o).register_forward_pre_hook(zero_head)
    try:
        with torch.no_grad():
            expected = model(**x).logits
    finally:
        handle.remove()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(got, m.run(x).output)


@pytest.mark.parametrize("model_type", LAYOUT_KINDS)
def test_activation_patching_an_encoder_position_equals_hand_hooks(model_type):
    model = model_of(model_type)
    m = cp.wrap(model)
    clean, corrupt = inputs(5), inputs(6)
    corrupt["decoder_input_ids"] = clean["decoder_input_ids"]  # the corruption is in the source only
    metric = cp.metrics.logit_diff(7, 8)
    res = cp.activation_patching(m, clean, corrupt, "encoder.resid_pre.*[enc_pos=2]", metric)
    layers, _ = blocks(model, "encoder")
    with torch.no_grad():
        source = model(**clean, output_hidden_states=True).encoder_hidden_states
        base = metric(model(**corrupt).logits).mean()
    assert res.dims == ("layer",) and len(res.values) == len(layers)
    for layer, block in enumerate(layers):
        def patch(module, args, kwargs, layer=layer):
            h = args[0].clone()
            h[:, 2] = source[layer][:, 2]
            return (h, *args[1:]), kwargs

        handle = block.register_forward_pre_hook(patch, with_kwargs=True)
        try:
            with torch.no_grad():
                effect = metric(model(**corrupt).logits).mean() - base
        finally:
            handle.remove()
        assert abs(float(res.values[layer]) - float(effect)) < 1e-5
    assert any(abs(float(v)) > 1e-3 for v in res.values)


@pytest.mark.parametrize("model_type", LAYOUT_KINDS)
def test_a_decoder_patch_leaves_earlier_decoder_positions_alone(model_type):
    m = cp.wrap(model_of(model_type))
    clean, corrupt = inputs(7), inputs(8)
    cache = m.capture(clean, ["decoder.resid_pre.1"])
    base = m.run(corrupt).output
    out = m.run(corrupt, {"decoder.resid_pre.1[pos=3]": cp.Patch(cache)}).output
    torch.testing.assert_close(out[:, :3], base[:, :3], atol=0, rtol=0)
    assert not torch.allclose(out[:, 3:], base[:, 3:])
