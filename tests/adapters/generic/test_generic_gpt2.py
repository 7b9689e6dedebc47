"""A transformers GPT-2 wrapped with the generic adapter: pos/dim axes, and the same numbers as the transformers adapter."""

from __future__ import annotations

import pytest
import torch

import crosspatch as cp
from conftest import randomize

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=50, bos_token_id=0, eos_token_id=0)
    return randomize(GPT2LMHeadModel(config)).eval()


def ids(seed: int, rows: int = 3, length: int = 6) -> torch.Tensor:
    return torch.randint(0, 50, (rows, length), generator=torch.Generator().manual_seed(seed))


def test_wrap_picks_the_transformers_adapter_unless_generic_is_asked_for(gpt2):
    assert cp.wrap(gpt2).adapter.name == "transformers"
    assert cp.wrap(gpt2, adapter="generic").adapter.name == "generic"


def test_axes_are_pos_and_dim_where_the_config_says_so(gpt2):
    m = cp.wrap(gpt2, adapter="generic")
    m.prepare(ids(0, rows=1))  # one row: the position embedding's [1, pos, dim] must still not pass as batched
    axes = {f.name: tuple((a.name, a.size) for a in f.axes) for f in m.sites()}
    assert axes["module.transformer.h"] == (("pos", 6), ("dim", 16))
    assert axes["module_in.transformer.h"] == (("pos", 6), ("dim", 16))
    assert axes["module.transformer.h.mlp.c_fc"] == (("pos", 6), ("d2", 64))  # positions, then a wider axis
    assert axes["module"] == (("pos", 6), ("d2", 50))  # the logits: the ModelOutput's first tensor field
    assert "module.transformer.wpe" not in axes and "module_in" not in axes  # unbatched; token ids
    assert m.catalog.family("module.transformer.h").layers == 2
    assert m.adapter.sizes(m.prepare(ids(0))) == {"pos": 6}


def test_blocks_equal_the_transformers_adapters_residual_stream(gpt2):
    x = ids(1)
    generic = cp.wrap(gpt2, adapter="generic").capture(x, ["module.transformer.h.*", "module_in.transformer.h.*",
                                                           "module.transformer.h.attn.*", "module.transformer.h.mlp.*"])
    reference = cp.wrap(gpt2).capture(x, ["resid_post.*", "resid_pre.*", "attn_out.*", "mlp_out.*"])
    for layer in range(2):
        assert torch.equal(generic[f"module.transformer.h.{layer}"], reference[f"resid_post.{layer}"])
        assert torch.equal(generic[f"module_in.transformer.h.{layer}"], reference[f"resid_pre.{layer}"])
        assert torch.equal(generic[f"module.transformer.h.attn.{layer}"], reference[f"attn_out.{layer}"])
        assert torch.equal(generic[f"module.transformer.h.mlp.{layer}"], reference[f"mlp_out.{layer}"])


def test_patching_a_block_equals_the_transformers_adapter(gpt2):
    clean, corrupt = ids(2), ids(3)
    answer, other = clean[:, -1], (clean[:, -1] + 1) % 50
    metric = cp.metrics.logit_diff(answer, other)
    generic = cp.activation_patching(cp.wrap(gpt2, adapter="generic"), clean, corrupt,
                                     "module.transformer.h.*[pos=*]", metric)
    reference = cp.activation_patching(cp.wrap(gpt2), clean, corrupt, "resid_post.*[pos=*]", metric,
                                       reuse_prefix=False)
    assert generic.dims == reference.dims == ("layer", "pos")
    assert torch.allclose(torch.as_tensor(generic.values), torch.as_tensor(reference.values), atol=1e-5)
    assert abs(generic.values).max() > 1e-3


def test_zero_on_an_mlp_equals_the_transformers_adapter(gpt2):
    x = ids(4)
    generic = cp.wrap(gpt2, adapter="generic").run(x, {"module.transformer.h.mlp.1[pos=2]": cp.Zero()}).output
    reference = cp.wrap(gpt2).run(x, {"mlp_out.1[pos=2]": cp.Zero()}).output
    assert torch.allclose(generic, reference, atol=1e-6)
    assert not torch.allclose(generic, gpt2(x).logits, atol=1e-4)
