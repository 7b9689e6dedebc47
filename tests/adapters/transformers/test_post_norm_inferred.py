"""Post-norm blocks (``mid = norm(x + attn(x))``, ``y = norm(mid + mlp(mid))``: BART's decoder, Marian,
TrOCR ...) read by architecture inference, against transformers' hidden states and hand-written hooks."""

from __future__ import annotations

import warnings

import torch

import crosspatch as cp
from hand_hooks import logits_with, zero_head
from crosspatch.adapters.transformers.mapping import mapping_for
from crosspatch.adapters.transformers.tiny import tiny_model


def test_bart_decoder_is_read_as_post_norm_and_its_sites_add_up():
    model = tiny_model("bart")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = cp.wrap(model)
    arch = mapping_for(model).arch
    assert (arch.resid_mid, arch.resid_norm, arch.mlp) == ("self_attn_layer_norm", "final_layer_norm", "fc2")
    assert {"head_out", "head_in", "resid_mid", "mlp_act"} <= {f.name for f in m.sites()}, m.catalog.unavailable
    x = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    cache = m.capture(x, ["resid_pre.*", "attn_out.*", "resid_mid.*", "mlp_out.*", "resid_post.*", "head_out.*"])
    with torch.no_grad():
        hidden = model(x, output_hidden_states=True).hidden_states
    for layer, block in enumerate(model.model.decoder.layers):
        at = lambda name: cache[f"{name}.{layer}"]  # noqa: E731
        torch.testing.assert_close(at("resid_pre"), hidden[layer], atol=1e-6, rtol=0)
        torch.testing.assert_close(block.self_attn_layer_norm(at("resid_pre") + at("attn_out")), at("resid_mid"), atol=1e-5, rtol=0)
        torch.testing.assert_close(block.final_layer_norm(at("resid_mid") + at("mlp_out")), at("resid_post"), atol=1e-5, rtol=0)
        heads = at("head_out").sum(2) + block.self_attn.out_proj.bias
        torch.testing.assert_close(heads, at("attn_out"), atol=1e-5, rtol=0)
    # Head 1 of layer 1 zeroed: a hook on the output projection's input.
    got = m.run(x, {"head_out.1[head=1]": cp.Zero()}).output
    o_proj = model.model.decoder.layers[1].self_attn.out_proj
    torch.testing.assert_close(got, logits_with(model, o_proj, zero_head(1, 64 // 4), x, pre=True), atol=1e-5, rtol=0)
