"""Check the hand-written GPT-2 oracle against HuggingFace's own forward."""
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from reference_gpt2 import gpt2_reference

N_LAYER, N_HEAD, D, V, T = 2, 4, 64, 100, 10


def make_model(**overrides):
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=N_LAYER, n_head=N_HEAD, n_embd=D, vocab_size=V, n_positions=32, **overrides)
    return GPT2LMHeadModel(cfg).eval()


@pytest.fixture
def ids():
    return torch.randint(0, V, (3, T), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("scale_by_layer", [False, True])
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_matches_hf(ids, dtype, atol, scale_by_layer):
    model = make_model(scale_attn_by_inverse_layer_idx=scale_by_layer).to(dtype)
    assert model.lm_head.weight is model.transformer.wte.weight  # tied
    ref = gpt2_reference(model, ids)
    with torch.no_grad():
        hf = model(ids, output_hidden_states=True)

    assert ref["logits"].dtype == dtype
    torch.testing.assert_close(ref["logits"], hf.logits, atol=atol, rtol=0)
    for l in range(N_LAYER):
        torch.testing.assert_close(ref[f"resid_pre.{l}"], hf.hidden_states[l], atol=atol, rtol=0)
    torch.testing.assert_close(ref["embed"], hf.hidden_states[0], atol=0, rtol=0)


@pytest.mark.parametrize("scale_by_layer", [False, True])
def test_internal_consistency(ids, scale_by_layer):
    model = make_model(scale_attn_by_inverse_layer_idx=scale_by_layer)
    ref = gpt2_reference(model, ids)
    M = model.config.n_inner or 4 * D
    above_diag = torch.ones(T, T, dtype=torch.bool).triu(1)
    for l in range(N_LAYER):
        pattern = ref[f"attn_pattern.{l}"]
        assert pattern.shape == (3, N_HEAD, T, T)
        torch.testing.assert_close(pattern.sum(-1), torch.ones(3, N_HEAD, T))
        assert (pattern[..., above_diag] == 0).all()

        head_out = ref[f"head_out.{l}"]
        assert head_out.shape == (3, T, N_HEAD, D)
        bias = model.transformer.h[l].attn.c_proj.bias
        torch.testing.assert_close(ref[f"attn_out.{l}"], head_out.sum(2) + bias)
        torch.testing.assert_close(ref[f"resid_mid.{l}"], ref[f"resid_pre.{l}"] + ref[f"attn_out.{l}"])
        torch.testing.assert_close(ref[f"resid_post.{l}"], ref[f"resid_mid.{l}"] + ref[f"mlp_out.{l}"])
        assert ref[f"mlp_act.{l}"].shape == (3, T, M)
        if l + 1 < N_LAYER:
            assert ref[f"resid_pre.{l + 1}"] is ref[f"resid_post.{l}"]
    assert ref["logits"].shape == (3, T, V)


def test_layer_scaling_changes_pattern(ids):
    # Guard against the flag being silently ignored: layer 1's pattern must differ.
    plain = gpt2_reference(make_model(), ids)
    scaled = gpt2_reference(make_model(scale_attn_by_inverse_layer_idx=True), ids)
    torch.testing.assert_close(plain["attn_pattern.0"], scaled["attn_pattern.0"])
    assert not torch.allclose(plain["attn_pattern.1"], scaled["attn_pattern.1"])
