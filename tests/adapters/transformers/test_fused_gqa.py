"""head_in through fused query/key/value projections with fewer key/value heads than query heads (Phi-3's
``qkv_proj``, GPT-BigCode's ``c_attn`` with and without multi-query, Falcon's ``query_key_value`` with
multi-query and with the new decoder architecture's grouped layout), on tiny models built from configs.

Oracles: the layout inference finds is the one each model's code uses (written out below from the
modeling code, not from the library); a patch of one query head's, key/value head's key or value input
equals a hand hook that recomputes that head's columns of the projection from the other input; an adapter
given the flipped layout fails the proof (which compares with the states handed to the attention
function, so it does not lean on the layout); ``head_in`` gradients equal autograd through the exact
write path, each slot of a key/value group carrying an equal share; EAP's score of an edge into a
key/value receiver is the derivative of patching it, and AtP credits a key/value head as the sum over its
group. Under multi-query attention both column orders are the same, so there is no flip to fail.
"""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

import crosspatch as cp
from conftest import randomize
from crosspatch.adapters.transformers.mapping import mapping_for
from crosspatch.adapters.transformers.proof import prove
from crosspatch.engine.interventions import Patch
from crosspatch.methods.attribution import _Tap, attribution_patching
from crosspatch.methods.edge_masks import masked_edges_output
from crosspatch.methods.edges import EdgePatcher, eap, edge_graph
from crosspatch.sites.catalog import Catalog

H, E = 4, 16  # query heads, head width (d_model 64)


def _phi3():
    from transformers import Phi3Config, Phi3ForCausalLM

    return Phi3ForCausalLM(Phi3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=H,
                                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, pad_token_id=0,
                                      initializer_range=0.2))


def _bigcode(multi_query: bool):
    from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM

    return GPTBigCodeForCausalLM(GPTBigCodeConfig(n_embd=64, n_layer=2, n_head=H, vocab_size=128, n_positions=64,
                                                  multi_query=multi_query, bos_token_id=0, eos_token_id=0,
                                                  initializer_range=0.2))


def _falcon(**kw):
    from transformers import FalconConfig, FalconForCausalLM

    return FalconForCausalLM(FalconConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=H, vocab_size=128,
                                          bias=True, bos_token_id=0, eos_token_id=0, initializer_range=0.2, **kw))


def _role_major(kv):  # [q heads | k heads | v heads]: Phi-3 slices, BigCode and Falcon multi-query split
    return lambda role, head: (head if role == 0 else H + (role - 1) * kv + head) * E


def _grouped(kv):  # Falcon's new architecture views [kv_head, group + 2, d_head]: the group's queries, its k, its v
    g = H // kv
    return lambda role, head: ((head // g) * (g + 2) + head % g if role == 0 else head * (g + 2) + g + role - 1) * E


# name: (build, key/value heads, input norm of a block, the column start of (role, head) by the modeling code)
MODELS = {
    "phi3": (_phi3, 2, "input_layernorm", _role_major(2)),
    "bigcode_mq": (lambda: _bigcode(True), 1, "ln_1", _role_major(1)),
    "bigcode": (lambda: _bigcode(False), 4, "ln_1", lambda role, head: (head * 3 + role) * E),  # view [head, 3 * e]
    "falcon_mq": (lambda: _falcon(multi_query=True), 1, "input_layernorm", _role_major(1)),
    "falcon_new": (lambda: _falcon(new_decoder_architecture=True, num_kv_heads=2), 2, "ln_attn", _grouped(2)),
}
_BUILT: dict[str, torch.nn.Module] = {}


def model(name: str, double: bool = False):
    key = f"{name}:{double}"
    if key not in _BUILT:
        torch.manual_seed(0)
        built = randomize(MODELS[name][0]().eval())
        _BUILT[key] = built.double() if double else built
    return _BUILT[key]


def wrapped(built):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cp.wrap(built)


IDS = torch.randint(2, 128, (2, 7), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_layout_found_is_the_models_and_a_head_patch_is_the_hand_hook(name):
    build, kv, norm, start = MODELS[name]
    built = model(name)
    m = wrapped(built)
    layout = mapping_for(built).layout
    assert "head_in" in m.catalog, m.catalog.unavailable.get("head_in")
    assert m.catalog.family("head_in").reach.kv_heads == kv
    assert (layout.kv_heads or H) == kv
    block = built.base_model.get_submodule(mapping_for(built).arch.layers)[1]
    proj = block.get_submodule(layout.qkv[0])
    x = m.capture(IDS, "resid_pre.1")["resid_pre.1"]
    other = x + torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    base = m.capture(IDS, "head_in.1")["head_in.1"]
    clean = m.run(IDS).output
    g = H // kv
    for role, head in ((0, 1), (0, 3), (1, 0), (1, kv - 1), (2, kv - 1)):
        cols = slice(start(role, head), start(role, head) + E)

        def hook(module, args, output):
            out = output.clone()
            with torch.no_grad():
                out[..., cols] = torch.nn.functional.linear(block.get_submodule(norm)(other), module.weight, module.bias)[..., cols]
            return out

        value = base.clone()
        heads = slice(head, head + 1) if role == 0 else slice(head * g, (head + 1) * g)  # a key/value head: its group's slots
        value[:, :, role, heads] = other[:, :, None]
        patched = m.run(IDS, {"head_in.1": Patch(cp.Cache({"head_in.1": value}, {"head_in.1": ()}))}).output
        handle = proj.register_forward_hook(hook)
        try:
            with torch.no_grad():
                expected = built(IDS).logits
        finally:
            handle.remove()
        torch.testing.assert_close(patched, expected, rtol=1e-5, atol=1e-5)
        assert (patched - clean).abs().max() > 1e-3, (role, head)


@pytest.mark.parametrize("name", ["phi3", "bigcode", "falcon_new"])
def test_an_adapter_on_the_flipped_layout_fails_the_proof(name):
    built = model(name)
    m = wrapped(built)
    mapping = mapping_for(built)
    assert not prove(built, m.adapter, m.catalog, mapping.arch, mapping.layout).failed
    flipped = dataclasses.replace(mapping.layout, head_major=not mapping.layout.head_major)
    families = m.adapter._families(built, mapping.arch, flipped, mapping.positions, mapping.n_heads)
    catalog = Catalog([f for f in families if f.name in m.catalog], m.catalog.model_name)
    failed = prove(built, m.adapter, catalog, mapping.arch, flipped).failed
    assert "replaced in the attention" in failed["head_in"]


def _metric(out):
    return out[:, -1].log_softmax(-1)[:, 7].sum()


@pytest.mark.parametrize("name", ["phi3", "falcon_new", "bigcode_mq"])
def test_head_in_gradient_is_the_exact_write_paths_with_equal_shares_per_group(name):
    kv = MODELS[name][1]
    m = wrapped(model(name, double=True))
    tap = _Tap()
    (grad,) = torch.autograd.grad(_metric(m.run(IDS, {"head_in.1": tap}, grad=True).output), [tap.delta])
    base = m.capture(IDS, "head_in.1")["head_in.1"]
    gen = torch.Generator().manual_seed(6)
    for role, head in ((0, 2), (1, 3), (2, 0)):
        v = torch.randn(base.shape[0], base.shape[1], base.shape[-1], generator=gen, dtype=torch.float64)
        edited = base.clone()
        edited[:, :, role, head] += 1e-9 * v
        edited.requires_grad_(True)
        cache = cp.Cache({"head_in.1": edited}, {"head_in.1": ()})
        out = m.run(IDS, {f"head_in.1[qkv={role},head={head}]": Patch(cache)}, grad=True).output
        (exact,) = torch.autograd.grad(_metric(out), [edited])
        torch.testing.assert_close(grad[:, :, role, head], exact[:, :, role, head], rtol=1e-5, atol=1e-7)
        assert exact[:, :, role, head].abs().max() > 1e-4
    g = H // kv  # each query head's key/value slot reads its key/value head: an equal share of its gradient
    kvs = grad[:, :, 1:].unflatten(3, (kv, g))
    torch.testing.assert_close(kvs, kvs[:, :, :, :, :1].expand_as(kvs), rtol=0, atol=0)
    assert grad[:, :, 1:].abs().amax(dim=(0, 1, 4)).min() > 1e-6


def test_atp_credits_a_grouped_kv_head_as_the_sum_over_its_query_heads():
    m = wrapped(model("falcon_new", double=True))
    corrupt = IDS.clone()
    corrupt[:, 3] = (IDS[:, 3] + 17) % 120 + 2
    metric = cp.metrics.logit_diff(IDS[:, -1], (IDS[:, -1] + 1) % 128)
    per_slot = attribution_patching(m, IDS, corrupt, "head_in.1[qkv=2,head=*]", metric, direction="noising").values
    for a in (0, 2):
        kv = attribution_patching(m, IDS, corrupt, f"head_in.1[qkv=2,head={a}:{a + 2}]", metric, direction="noising")
        assert float(kv.values) == pytest.approx(per_slot[a] + per_slot[a + 1], rel=1e-9)
        assert per_slot[a] == pytest.approx(per_slot[a + 1], rel=1e-9)
        base, source = m.capture(IDS, "head_in.1")["head_in.1"], m.capture(corrupt, "head_in.1")["head_in.1"]
        direction = torch.zeros_like(base)
        direction[:, :, 2, a : a + 2] = (source - base)[:, :, 2, a : a + 2]
        edited = (base + 1e-9 * direction).requires_grad_(True)
        cache = cp.Cache({"head_in.1": edited}, {"head_in.1": ()})
        out = m.run(IDS, {f"head_in.1[qkv=2,head={a}:{a + 2}]": Patch(cache)}, grad=True).output
        (grad,) = torch.autograd.grad(metric(out).mean(), [edited])
        assert float(kv.values) == pytest.approx(float((grad * direction).sum()), rel=1e-5, abs=1e-10)
        assert abs(float(kv.values)) > 1e-6


@pytest.mark.parametrize("name", ["phi3", "bigcode_mq"])
def test_eap_scores_into_kv_receivers_are_the_derivative_of_edge_patching(name):
    kv = MODELS[name][1]
    m = wrapped(model(name, double=True))
    corrupt = IDS.clone()
    corrupt[:, 3] = (IDS[:, 3] + 17) % 120 + 2
    metric = cp.metrics.logit_diff(IDS[:, -1], (IDS[:, -1] + 1) % 128)
    g = edge_graph(m)
    assert g.kv_group == H // kv
    last = f"{kv - 1 if kv > 1 else 0}"
    group = H // kv
    kv_range = lambda j: f"{j * group}:{(j + 1) * group}"  # noqa: E731
    edges = [f"embed->head_in.1[qkv=1,head={kv_range(0)}]", f"head_out.0[head=1]->head_in.1[qkv=2,head={kv_range(int(last))}]",
             f"mlp_out.0->head_in.1[qkv=1,head={kv_range(int(last))}]", "head_out.0[head=2]->head_in.1[qkv=0,head=3]"]
    scores = eap(m, IDS, corrupt, metric, graph=g)
    p = EdgePatcher(m, IDS, corrupt, "resample", None, g)
    weights = torch.full((1, len(g)), 1e-9, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(metric(masked_edges_output(p, weights)).mean(), [weights])
    for e in edges:
        assert float(scores.sel(edge=e).values) == pytest.approx(float(grad[0, g.index(e)]), rel=1e-5, abs=1e-10), e
    assert max(abs(float(scores.sel(edge=e).values)) for e in edges) > 1e-4


@pytest.mark.parametrize("name", ["falcon_new", "falcon_mq"])
def test_falcon_writes_survive_the_blocks_in_place_sum(name):
    """Falcon's parallel block adds the attention's write to the MLP's output in place: mlp_out is still the
    MLP's own write (a hand hook's copy at its return), the writes sum to the block output, and a patched
    mlp_out is what the block adds."""
    from crosspatch.engine.interventions import Zero

    built = model(name)
    m = wrapped(built)
    assert all(f in m.catalog for f in ("attn_out", "mlp_out", "mlp_act")), m.catalog.unavailable
    mlp = built.transformer.h[0].mlp
    seen = []
    handle = mlp.register_forward_hook(lambda module, args, output: seen.append(output.detach().clone()))
    try:
        c = m.capture(IDS, ["resid_pre.0", "attn_out.0", "mlp_out.0", "resid_post.0"])
    finally:
        handle.remove()
    torch.testing.assert_close(c["mlp_out.0"], seen[0], rtol=0, atol=0)
    torch.testing.assert_close(c["resid_pre.0"] + c["attn_out.0"] + c["mlp_out.0"], c["resid_post.0"], rtol=1e-5, atol=1e-5)
    handle = mlp.register_forward_hook(lambda module, args, output: torch.zeros_like(output))
    try:
        with torch.no_grad():
            expected = built(IDS).logits
    finally:
        handle.remove()
    torch.testing.assert_close(m.run(IDS, {"mlp_out.0": Zero()}).output, expected, rtol=1e-6, atol=1e-6)


def test_an_encoder_decoder_outside_the_table_is_not_inferred_as_one_stack():
    """MVP's encoder and decoder run along different positions (source and target): inference, which reads one
    stack, refuses it and says why (the generic adapter serves it), while BART's decoder alone is inferred."""
    from crosspatch.adapters.transformers.tiny import tiny_model

    mapping = mapping_for(tiny_model("mvp", "seq2seq-lm"))
    assert mapping.arch is None and "encoder-decoder" in mapping.error
    assert mapping_for(tiny_model("bart", "causal-lm")).arch is not None
