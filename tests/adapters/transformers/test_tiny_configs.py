"""The tiny-config shrinker (crosspatch.adapters.transformers.tiny) on configs whose sizes depend on each
other, and the proof on a model whose pattern no module computes: what these unlock is checked against
hand-written hooks, not only built."""

from __future__ import annotations

import warnings

import pytest
import torch

import crosspatch as cp
from hand_hooks import logits_with, zero_head
from crosspatch.adapters.transformers.mapping import mapping_for
from crosspatch.adapters.transformers.tiny import tiny_config, tiny_model


def ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(seed))


def wrapped(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cp.wrap(model)


def test_latent_attention_keeps_its_tied_head_widths():
    """DeepSeek's latent attention rotates ``head_dim`` features of the ``qk_rope_head_dim`` part, and has
    a key and a value per query head: shrunk apart, the model does not run."""
    config = tiny_config("deepseek_v3")
    assert config.head_dim == config.qk_rope_head_dim < 64
    assert config.qk_head_dim == config.qk_nope_head_dim + config.qk_rope_head_dim
    assert config.num_key_value_heads == config.num_attention_heads
    assert tiny_config("llama").num_key_value_heads < tiny_config("llama").num_attention_heads  # GQA kept elsewhere


def test_sizes_left_unset_are_filled_and_composite_configs_give_their_text_config():
    assert tiny_config("hunyuan_v1_dense").head_dim == 64 // 4
    dots = tiny_config("dots1")
    assert (dots.n_routed_experts, dots.num_experts_per_tok) == (4, 2)
    model = tiny_model("qwen3_5")  # the causal LM of a composite (vision + text) config reads the text config
    assert type(model.config).__name__ == "Qwen3_5TextConfig"
    with torch.no_grad():
        assert model(ids()).logits.shape == (2, 6, model.config.vocab_size)


def _zero_head_against_hook(model, m, layer: int, head: int) -> None:
    mp = mapping_for(model).arch
    o_proj = model.base_model.get_submodule(f"{mp.layers}.{layer}.{mp.o_proj}")
    d_head = m.catalog.family("head_z").axis("d_head").size
    x = ids(3)
    got = m.run(x, {f"head_out.{layer}[head={head}]": cp.Zero()}).output
    torch.testing.assert_close(got, logits_with(model, o_proj, zero_head(head, d_head), x, pre=True), atol=1e-5, rtol=0)


def test_latent_attention_heads_are_exact():
    model = tiny_model("deepseek_v3")
    m = wrapped(model)
    assert {"head_out", "head_z", "attn_pattern"} <= {f.name for f in m.sites()}, m.catalog.unavailable
    assert m.catalog.family("head_z").axis("d_head").size == model.config.v_head_dim
    _zero_head_against_hook(model, m, layer=1, head=2)


@pytest.mark.parametrize("model_type", ["roformer"])
def test_a_pattern_no_module_computes_is_unavailable_and_the_heads_still_served(model_type):
    """RoFormer computes its pattern inline (no attention function, no module handed it): the proof says
    so and serves the rest."""
    model = tiny_model(model_type)
    m = wrapped(model)
    assert "never reached" in m.catalog.unavailable["attn_pattern"]
    assert "head_out" in {f.name for f in m.sites()}
    _zero_head_against_hook(model, m, layer=0, head=1)
