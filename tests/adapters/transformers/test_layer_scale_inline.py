"""BEiT's layer scale, a parameter the block multiplies each branch's output by inline (no module outputs
the scaled write): inferred (crosspatch.adapters.transformers.scaled), against transformers' hidden states
and hand-written hooks."""

from __future__ import annotations

import warnings

import torch

import crosspatch as cp
from crosspatch.adapters.transformers.mapping import mapping_for
from crosspatch.adapters.transformers.tiny import tiny_model
from crosspatch.testing import check_adapter


def test_beit_writes_are_the_scaled_branch_outputs_and_add_up():
    model = tiny_model("beit", "image-classification")
    with torch.no_grad():
        for layer in model.beit.layers:  # layer scales away from their 0.1 init, each its own
            layer.lambda_1.uniform_(0.5, 2.0)
            layer.lambda_2.uniform_(0.5, 2.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = cp.wrap(model)
    arch = mapping_for(model).arch
    assert (arch.attn_scale, arch.mlp_scale) == ("lambda_1", "lambda_2")
    assert {"head_out", "attn_out", "mlp_out", "mlp_act"} <= {f.name for f in m.sites()}
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    cache = m.capture(x, ["resid_pre.*", "attn_out.*", "mlp_out.*", "resid_post.*"])
    block = model.beit.layers[1]
    seen = []
    handle = block.attention.register_forward_hook(lambda module, args, output: seen.append(output[0]))
    try:
        with torch.no_grad():
            hidden = model(pixel_values=x, output_hidden_states=True).hidden_states
    finally:
        handle.remove()
    torch.testing.assert_close(cache["attn_out.1"], block.lambda_1 * seen[0], atol=1e-6, rtol=0)
    for layer in range(2):
        at = lambda name: cache[f"{name}.{layer}"]  # noqa: E731
        torch.testing.assert_close(at("resid_pre"), hidden[layer], atol=1e-6, rtol=0)
        torch.testing.assert_close(at("resid_pre") + at("attn_out") + at("mlp_out"), at("resid_post"), atol=1e-5, rtol=0)

    # Zeroing the attention's write equals a hook zeroing the attention's output.
    got = m.run(x, {"attn_out.1": cp.Zero()}).output
    handle = block.attention.register_forward_hook(lambda module, args, output: (torch.zeros_like(output[0]), *output[1:]))
    try:
        with torch.no_grad():
            expected = model(pixel_values=x).logits
    finally:
        handle.remove()
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    report = check_adapter(model, x, m.adapter, cuda=False)
    assert not report.failures, str(report)
