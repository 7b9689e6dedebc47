"""CD-T (crosspatch.methods.cdt) on tiny GPT-2, Llama-family and BERT models built from configs.

The oracle is the model itself: at every node the decomposed forward visits, ``rel + irrel`` equals the
activation the engine captures from the model's own forward, to 1e-5 in float32 and 1e-10 in float64, with
and without padding, for every source set of a batch (zero and mean baselines). Beside it: sources that are
everything make ``irrel`` exactly zero and ``rel`` the model's activations; no source leaves ``rel`` exactly
zero (but in the relevant attention pattern); batched source sets equal one-at-a-time runs; a run that
starts at a later block equals one from the embedding.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import crosspatch as cp
from conftest import padded_prompts, randomize, tiny_bert, tiny_gpt2, tiny_llama, tiny_roberta
from crosspatch.adapters.transformers.tiny import tiny_model
from crosspatch.methods.cdt import Decomposition, DecomposedForward, cdt, decompose

TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}
BUILDERS = {
    "gpt2": tiny_gpt2,
    "llama": tiny_llama,  # rotary, RMSNorm, 4 query heads on 2 key/value heads, gated MLP
    "bert": tiny_bert,  # post-LN encoder, masked-LM head
    "qwen2": lambda: tiny_llama("qwen2"),  # query / key / value biases
    "mistral": lambda: tiny_model("mistral"),  # a sliding window of 4 positions
    "roberta": tiny_roberta,
    "bert-cls": lambda: tiny_bert("cls"),  # pooler and classifier
}
# Source sets of one batch: a head at one position, an MLP and an embedding position together, none, a
# residual position at block 1, every embedding position.
SETS = [["head_z.0[pos=2,head=1]"], ["mlp_out.0[pos=3]", "embed[pos=1]"], [], ["resid_mid.1[pos=4]"], ["embed"]]
NONE, EVERYTHING = 2, 4


def build(name: str, dtype: torch.dtype = torch.float32):
    model = randomize(BUILDERS[name]()).to(dtype)
    return cp.wrap(model)


def prompts(m, seed: int = 0, pad=None, rows: int = 3) -> dict:
    inputs = padded_prompts(seed, rows=rows, pad=pad)
    inputs["input_ids"] = inputs["input_ids"] % m.module.config.vocab_size
    return inputs


def model_values(m, inputs, dec: Decomposition) -> dict[str, torch.Tensor]:
    """The model's own activation at every node the catalog has too."""
    keys = [k for k in dec.rel if k.split(".")[0] in m.catalog]
    return dict(m.capture(inputs, keys).items())


def largest_error(dec: Decomposition, own: dict[str, torch.Tensor]) -> tuple[float, str]:
    errors = {key: (dec.total(key) - value.unsqueeze(0)).abs().max().item() for key, value in own.items()}
    key = max(errors, key=errors.get)
    return errors[key], key


@pytest.mark.parametrize("pad", [None, "left", "right"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("name", ["gpt2", "llama", "bert"])
def test_rel_plus_irrel_is_the_models_activation_at_every_node(name, dtype, pad):
    m = build(name, dtype)
    inputs = prompts(m, pad=pad)
    for irrel, reference in (("zero", None), ("mean", prompts(m, seed=5, rows=4, pad=pad))):
        dec = decompose(m, inputs, SETS, "all", irrel=irrel, reference=reference)
        own = model_values(m, inputs, dec)
        families = {k.split(".")[0] for k in own}
        assert {"embed", "resid_pre", "head_in", "attn_pattern", "head_z", "attn_out", "resid_mid", "mlp_act",
                "mlp_out", "resid_post", "logits"} <= families
        error, where = largest_error(dec, own)
        assert error < TOLERANCE[dtype], f"{name} {dtype} pad={pad} irrel={irrel}: {error:.3g} at {where}"
        assert all(dec.rel[k].dtype == dtype for k in dec.rel)


@pytest.mark.parametrize("name", ["qwen2", "mistral", "roberta", "bert-cls"])
def test_exact_on_more_of_each_family(name):
    m = build(name, torch.float64)
    for pad in ("left", "right"):
        inputs = prompts(m, pad=pad)
        dec = decompose(m, inputs, SETS, "all", irrel="mean", reference=prompts(m, seed=7, rows=4))
        error, where = largest_error(dec, model_values(m, inputs, dec))
        assert error < 1e-10, f"{name} pad={pad}: {error:.3g} at {where}"


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_queries_keys_and_values_are_the_models(name):
    """head_q / head_k / head_v are no catalog family: the pattern and head_z the model computes from them."""
    m = build(name, torch.float64)
    inputs = prompts(m)  # no padding: the mask is the causal one
    dec = decompose(m, inputs, SETS, "all")
    attn = m.module.base_model.get_submodule("h.1.attn" if name == "gpt2" else "layers.1.self_attn")
    q, k, v = (dec.total(f"{n}.1")[0] for n in ("head_q", "head_k", "head_v"))  # [rows, pos, head, d]
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * attn.scaling
    causal = torch.ones(scores.shape[-2:], dtype=torch.bool).tril()
    pattern = scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)
    own = m.capture(inputs, ["attn_pattern.1", "head_z.1"])
    torch.testing.assert_close(pattern, own["attn_pattern.1"], atol=1e-12, rtol=0)
    torch.testing.assert_close(torch.einsum("bhqk,bkhd->bqhd", pattern, v), own["head_z.1"], atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert"])
def test_sources_that_are_everything_make_rel_the_model(name):
    m = build(name)
    inputs = prompts(m, pad="left")
    dec = decompose(m, inputs, [["embed"], ["resid_pre.1"]], "all")
    own = model_values(m, inputs, dec)
    for key, value in own.items():
        after_block_1 = key.split(".")[-1] == "1" or key in ("logits", "logits_in")
        for j in (0, 1) if after_block_1 else (0,):
            assert torch.equal(dec.irrel[key][j], torch.zeros_like(value)), f"set {j}: irrel at {key}"
            torch.testing.assert_close(dec.rel[key][j], value, atol=1e-5, rtol=0)
    # Before its sources the second set is all context.
    assert torch.equal(dec.rel["resid_post.0"][1], torch.zeros_like(own["resid_post.0"]))


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert"])
def test_no_source_leaves_rel_exactly_zero(name):
    m = build(name)
    inputs = prompts(m, pad="right")
    dec = decompose(m, inputs, [[]], "all")
    for key, rel in dec.rel.items():
        if key.startswith("attn_pattern"):
            # The paper's relevant pattern is softmax(q_rel k_rel^T + mask): the mask alone, uniform where allowed.
            torch.testing.assert_close(rel.sum(dim=-1), torch.ones_like(rel.sum(dim=-1)))
        else:
            assert torch.equal(rel, torch.zeros_like(rel)), key
    assert dec.coords == {"source": ["(none)"]}


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert"])
def test_batched_source_sets_equal_one_at_a_time(name):
    m = build(name, torch.float64)
    inputs = prompts(m, pad="left")
    targets = ["logits", "head_in.1[qkv=1,head=2]", "mlp_act.1[pos=5]"]
    batched = decompose(m, inputs, "head_z.*[pos=3,head=*]", targets, batch_size=10 ** 6)
    single = decompose(m, inputs, "head_z.*[pos=3,head=*]", targets, batch_size=3)
    assert batched.dims == ("layer", "head") and len(batched.sets) == 8
    for key in batched.rel:
        torch.testing.assert_close(batched.rel[key], single.rel[key], atol=1e-12, rtol=0)
        torch.testing.assert_close(batched.irrel[key], single.irrel[key], atol=1e-12, rtol=0)


def test_a_run_from_a_later_block_equals_one_from_the_embedding():
    m = build("gpt2", torch.float64)
    inputs = prompts(m, pad="right")
    late = decompose(m, inputs, [["head_z.1[pos=4,head=0]"]], ["logits"])  # starts at block 1
    early = decompose(m, inputs, [["head_z.1[pos=4,head=0]"]], ["logits", "embed"])  # a target at 0: starts there
    torch.testing.assert_close(late.rel["logits"], early.rel["logits"], atol=1e-12, rtol=0)
    assert late.rel["logits"].abs().max() > 1e-3


def test_the_mean_baseline_is_the_reference_mean_per_position():
    m = build("gpt2")
    inputs, reference = prompts(m), prompts(m, seed=3, rows=5, pad="right")
    source = "head_z.0[pos=1:8,head=2]"
    ref = m.capture(reference, ["head_z.0"])["head_z.0"]
    real = reference["attention_mask"][:, :, None, None].float()
    own = m.capture(inputs, ["head_z.0"])["head_z.0"]
    for over, mean in ((("batch",), (ref * real).sum(0) / real.sum(0)),
                       (("batch", "pos"), ((ref * real).sum((0, 1)) / real.sum((0, 1))).expand_as(ref[0]))):
        dec = decompose(m, inputs, [[source]], [source], irrel="mean", reference=reference, over=over)
        irrel, rel = dec.irrel[source][0], dec.rel[source][0]
        expected = mean[1:8, 2:3].expand_as(irrel)
        torch.testing.assert_close(irrel, expected, atol=1e-6, rtol=0)
        torch.testing.assert_close(rel, own[:, 1:8, 2:3] - expected, atol=1e-6, rtol=0)


def test_cdt_scores_the_relevant_logits_with_a_metric(pair):
    m = build("gpt2")
    clean, _ = pair
    answer = clean[:, -1]
    metric = cp.metrics.logit_diff(answer, (answer + 1) % 100)
    res = cdt(m, clean, "head_z.1[pos=*,head=*]", metric)
    assert res.dims == ("pos", "head") and res.values.shape == (9, 4)
    assert res.metadata["method"] == "cdt" and res.metadata["irrel"] == "zero"
    assert np.all(res.values[:-1] == 0)  # a head of the last block reaches the logits only at its own position
    assert np.abs(res.values[-1]).max() > 1e-3
    # logit_diff is linear: the relevant and irrelevant parts' shares add up to the model's own value.
    dec = decompose(m, clean, "head_z.1[pos=*,head=*]", "logits")
    own = metric(m.run(clean).output).double().mean().item()
    parts = [metric(dec.rel["logits"][j]) + metric(dec.irrel["logits"][j]) for j in range(len(dec.sets))]
    np.testing.assert_allclose(torch.stack(parts).double().mean(1).numpy(), own, atol=1e-5)
    assert res.metadata["full"] == pytest.approx(own, abs=1e-6)
    # Without a metric: the relevant norm's share; the embedding as a whole is all of it.
    share = cdt(m, clean, [["embed"], []], target="resid_post.1[pos=-1]")
    np.testing.assert_allclose(share.values, [1.0, 0.0], atol=1e-6)
    assert share.coords == {"source": ["embed", "(none)"]}


def test_head_out_is_set_at_its_head_z_and_head_in_reads_the_residual():
    m = build("llama")
    inputs = prompts(m)
    a = decompose(m, inputs, "head_out.0[pos=2,head=3]", ["head_in.1[qkv=0,head=1]", "resid_pre.1"])
    b = decompose(m, inputs, "head_z.0[pos=2,head=3]", ["head_in.1[qkv=0,head=1]", "resid_pre.1"])
    assert [str(s[0]) for s in a.sets] == ["head_z.0[pos=2,head=3]"]
    torch.testing.assert_close(a.rel["resid_pre.1"], b.rel["resid_pre.1"])
    torch.testing.assert_close(a.rel["head_in.1[qkv=0,head=1]"][:, :, :, 0, 0], b.rel["resid_pre.1"])


def test_refusals():
    m = build("gpt2")
    inputs = prompts(m)
    with pytest.raises(cp.SiteError, match="target only"):
        decompose(m, inputs, "attn_pattern.0", "logits")
    with pytest.raises(cp.SiteError, match="pattern"):
        decompose(m, inputs, "embed", "resid_post.*")
    with pytest.raises(cp.SiteError, match="cannot use"):
        decompose(m, inputs, "embed", "module.h.0")
    with pytest.raises(ValueError, match="reference"):
        decompose(m, inputs, "embed", irrel="mean")
    with pytest.raises(ValueError, match="metric reads the whole logits"):
        cdt(m, inputs, "embed", cp.metrics.logit_diff(1, 2), target="resid_post.1")
    from conftest import tiny_neox

    with pytest.raises(NotImplementedError, match="decomposed_forward"):
        decompose(tiny_neox(), inputs, "embed")


def test_the_seam():
    m = build("bert")
    forward = m.adapter.decomposed_forward(m.module)
    assert isinstance(forward, DecomposedForward)
    assert [f.name for f in forward.families][:3] == ["embed", "resid_pre", "head_in"]
    assert cp.Adapter().decomposed_forward(m.module) is None
    assert cp.cdt is cdt
