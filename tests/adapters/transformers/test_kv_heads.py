"""Key/value heads under grouped-query attention (a tiny Llama: 4 query heads on 2 key/value heads): a
key/value head is the slots ``head=a:b`` of the query heads it serves, and every edge method, AtP and AtP*
report it there: the edge graph has one key and one value receiver per key/value head, exact edge patching
into it is the hand-built patch, EAP's score is the derivative of that patch, and a key/value head's AtP
(AtP*) credit is the sum over its query heads' slots."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import crosspatch as cp
from conftest import randomize, tiny_gpt2, tiny_llama
from crosspatch.engine.interventions import Patch
from crosspatch.methods.attribution import _Tap, attribution_patching
from crosspatch.methods.edge_paths import connected, senders_of
from crosspatch.methods.edge_masks import masked_edges_output
from crosspatch.methods.edges import EdgePatcher, eap, eap_ig, edge_graph, patch_edges


@pytest.fixture(scope="module")
def gqa():
    m = cp.wrap(randomize(tiny_llama()).double())
    clean = torch.randint(2, 100, (3, 7), generator=torch.Generator().manual_seed(1))
    corrupt = clean.clone()
    corrupt[:, 3] = (clean[:, 3] + 17) % 98 + 2
    metric = cp.metrics.logit_diff(clean[:, -1], (clean[:, -1] + 1) % 100)
    return m, clean, corrupt, metric


def test_graph_has_a_key_and_a_value_receiver_per_kv_head(gqa):
    m, *_ = gqa
    g = edge_graph(m)
    assert g.kv_group == 2
    heads = [r for r in g.receivers if r.startswith("head_in.1")]
    assert heads == [f"head_in.1[qkv=0,head={h}]" for h in range(4)] + [
        f"head_in.1[qkv={q},head={a}:{a + 2}]" for q in (1, 2) for a in (0, 2)]
    assert senders_of("head_in.1[qkv=1,head=2:4]") == ["head_out.1[head=2]", "head_out.1[head=3]"]
    # multi-head attention keeps one receiver per head and role, as before
    mha = edge_graph(cp.wrap(tiny_gpt2()))
    assert mha.kv_group == 1 and all(":" not in r for r in mha.receivers)
    assert sum(r.startswith("head_in.1") for r in mha.receivers) == 12


def test_patching_an_edge_into_a_kv_head_is_the_hand_built_patch(gqa):
    m, clean, corrupt, _ = gqa
    g = edge_graph(m)
    edge = "head_out.0[head=3]->head_in.1[qkv=1,head=2:4]"
    out = patch_edges(m, clean, corrupt, g.mask([edge]), graph=g)
    # by hand: key/value head 1's key input (the slots of query heads 2 and 3) gets head 0.3's corrupt - clean write
    c, k = m.capture(clean, ["head_out.0", "head_in.1"]), m.capture(corrupt, ["head_out.0"])
    value = c["head_in.1"].clone()
    value[:, :, 1, 2:4] += (k["head_out.0"][:, :, 3] - c["head_out.0"][:, :, 3])[:, :, None]
    by_hand = m.run(clean, {"head_in.1[qkv=1,head=2:4]": Patch(cp.Cache({"head_in.1": value}, {"head_in.1": ()}))}).output
    torch.testing.assert_close(out, by_hand, rtol=1e-10, atol=1e-10)
    assert (out - m.run(clean).output).abs().max() > 1e-4


def test_eap_scores_are_the_derivative_of_edge_patching(gqa):
    """For query, key and value receivers: EAP's score of an edge is d metric / d t of the clean run with the
    edge patched by weight t, by autograd through the patch's own recomputation a hair away from t = 0
    (Llama's norms round to float32 even in double, too coarse for central differences)."""
    m, clean, corrupt, metric = gqa
    g = edge_graph(m)
    scores = eap(m, clean, corrupt, metric, graph=g)
    edges = ["embed->head_in.1[qkv=1,head=0:2]", "head_out.0[head=1]->head_in.1[qkv=2,head=2:4]",
             "mlp_out.0->head_in.1[qkv=1,head=2:4]", "embed->head_in.0[qkv=2,head=0:2]",
             "head_out.0[head=2]->head_in.1[qkv=0,head=3]", "mlp_out.0->logits_in"]
    p = EdgePatcher(m, clean, corrupt, "resample", None, g)
    weights = torch.full((1, len(g)), 1e-9, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(metric(masked_edges_output(p, weights)).mean(), [weights])
    for e in edges:
        assert float(scores.sel(edge=e).values) == pytest.approx(float(grad[0, g.index(e)]), rel=1e-5, abs=1e-10), e
    assert np.abs(scores.values).max() > 1e-3
    # the scorer fed by the backward and the one reading gradients agree (EAP-IG with one step is EAP)
    np.testing.assert_allclose(eap_ig(m, clean, corrupt, metric, steps=1, graph=g).values, scores.values, rtol=1e-9, atol=1e-12)


def test_a_kv_heads_atp_credit_is_the_sum_over_its_query_heads_slots(gqa):
    m, clean, corrupt, metric = gqa
    per_slot = attribution_patching(m, clean, corrupt, "head_in.1[qkv=1,head=*]", metric, direction="noising").values
    for a in (0, 2):
        kv = attribution_patching(m, clean, corrupt, f"head_in.1[qkv=1,head={a}:{a + 2}]", metric, direction="noising")
        assert float(kv.values) == pytest.approx(per_slot[a] + per_slot[a + 1], rel=1e-9)
        assert per_slot[a] == pytest.approx(per_slot[a + 1], rel=1e-9)  # an equal share per query head
        # the linear estimate is the derivative of patching the key/value head toward the corrupt run
        base, source = m.capture(clean, "head_in.1")["head_in.1"], m.capture(corrupt, "head_in.1")["head_in.1"]
        direction = torch.zeros_like(base)
        direction[:, :, 1, a : a + 2] = (source - base)[:, :, 1, a : a + 2]
        edited = (base + 1e-9 * direction).requires_grad_(True)
        cache = cp.Cache({"head_in.1": edited}, {"head_in.1": ()})
        out = m.run(clean, {f"head_in.1[qkv=1,head={a}:{a + 2}]": Patch(cache)}, grad=True).output
        (grad,) = torch.autograd.grad(metric(out).mean(), [edited])
        assert float(kv.values) == pytest.approx(float((grad * direction).sum()), rel=1e-5, abs=1e-10)


def test_atp_star_key_credit_of_a_kv_head_sums_its_query_heads_pattern_changes(gqa):
    m, clean, corrupt, metric = gqa
    star = attribution_patching(m, clean, corrupt, "head_in.1[qkv=1,head=*]", metric, direction="noising", qk_fix=True)
    # by hand: the metric's gradient at the clean pattern times the change of every head's pattern when its
    # key/value head's key input comes from the corrupt run
    tap = _Tap()
    grad_pattern = torch.autograd.grad(metric(m.run(clean, {"attn_pattern.1": tap}, grad=True).output).mean(), [tap.delta])[0]
    pattern = m.capture(clean, "attn_pattern.1")["attn_pattern.1"]
    source = m.capture(corrupt, "head_in.1")
    for a in (0, 2):
        patched = m.run(clean, {f"head_in.1[qkv=1,head={a}:{a + 2}]": Patch(source)}, capture="attn_pattern.1")
        change = patched.cache["attn_pattern.1"] - pattern
        by_hand = float((grad_pattern[:, a : a + 2] * change[:, a : a + 2]).sum())
        assert star.values[a] + star.values[a + 1] == pytest.approx(by_hand, rel=1e-6, abs=1e-12)
        assert star.values[a] == pytest.approx(star.values[a + 1], rel=1e-9)


def test_pruning_keeps_a_kv_head_that_feeds_a_kept_query_head(gqa):
    m, *_ = gqa
    g = edge_graph(m)
    kept = g.mask(["embed->head_in.1[qkv=1,head=2:4]", "head_out.1[head=3]->logits_in"]).numpy()
    assert (connected(g, kept) == kept).all()  # the key/value head reaches the output through query head 3
    lone = g.mask(["embed->head_in.1[qkv=1,head=2:4]", "head_out.1[head=1]->logits_in"]).numpy()
    assert connected(g, lone).sum() == 0  # head 1.1's key/value head is 0:2, which nothing feeds


def test_all_edges_patched_is_the_corrupt_run(gqa):
    m, clean, corrupt, _ = gqa
    g = edge_graph(m)
    out = patch_edges(m, clean, corrupt, torch.stack([torch.zeros(len(g)), torch.ones(len(g))]), graph=g)
    n = clean.shape[0]
    torch.testing.assert_close(out[:n], m.run(clean).output, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out[n:], m.run(corrupt).output, rtol=1e-6, atol=1e-6)
