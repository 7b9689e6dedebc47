"""Edge graphs of each CLIP tower (open_clip and HuggingFace CLIPModel on the same weights): exact edge
patching at both ends, EAP agreeing between the libraries, EAP's first-order identity, EAP-IG and ACDC."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import crosspatch as cp
from clip_models import images, texts, tiny_open_clip
from crosspatch.adapters.open_clip import to_transformers
from crosspatch.methods.attribution import _Tap
from crosspatch.methods.edges import acdc, eap, eap_ig, edge_graph, patch_edges

TOWERS = ("vision", "text")
LIBS = ("open_clip", "hf")


@pytest.fixture(scope="module")
def pair():
    model = tiny_open_clip()
    return {"open_clip": cp.wrap(model), "hf": cp.wrap(to_transformers(model))}


def pair_of_inputs(tower: str) -> tuple[dict, dict]:
    """Clean and corrupt runs that differ in ``tower``'s inputs only; those are the rows, the other tower's
    inputs are the candidates every row is scored against."""
    if tower == "vision":
        return {"images": images(2, seed=1), "texts": texts(3)}, {"images": images(2, seed=2), "texts": texts(3)}
    other = images(3)
    return ({"images": other, "texts": texts(2, seed=1), "rows": "texts"},
            {"images": other, "texts": texts(2, seed=2), "rows": "texts"})


def metric(out):
    return out[:, 0] - out[:, 1]


def test_graph_of_each_tower(pair):
    for m in pair.values():
        for t in TOWERS:
            g = edge_graph(m, tower=t)
            # senders: embed, 2 x (4 heads + mlp); receivers: 2 x (12 head inputs + mlp_in), logits_in
            assert len(g.senders) == 11 and len(g.receivers) == 27 and g.tower == f"{t}."
            assert all(n.startswith(f"{t}.") for n in g.senders + g.receivers)
            assert g.senders[0] == f"{t}.embed" and g.receivers[-1] == f"{t}.logits_in"
            assert len(g) == 12 * 1 + 5 + 12 * 6 + 10 + 11 == 110  # every receiver reads every earlier sender
        with pytest.raises(ValueError, match="tower"):
            edge_graph(m)
    assert pair["open_clip"].catalog.family("vision.head_in").axis_names == pair["hf"].catalog.family("vision.head_in").axis_names
    assert edge_graph(pair["hf"], tower="text").edge_names == edge_graph(pair["open_clip"], tower="text").edge_names


@pytest.mark.parametrize("lib", LIBS)
@pytest.mark.parametrize("tower", TOWERS)
def test_all_edges_give_the_corrupt_run_and_none_the_clean_run(pair, lib, tower):
    m = pair[lib]
    clean, corrupt = pair_of_inputs(tower)
    g = edge_graph(m, tower=tower)
    c, k = m.run(clean).output, m.run(corrupt).output
    assert (c - k).abs().max() > 1e-2
    out = patch_edges(m, clean, corrupt, torch.stack([torch.ones(len(g)), torch.zeros(len(g))]), graph=g)
    torch.testing.assert_close(out[: c.shape[0]], k, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[c.shape[0]:], c, atol=1e-5, rtol=1e-5)
    # one head's write into the readout alone: logits_in gets that head's (corrupt - clean) write, nothing else
    edge = f"{tower}.head_out.1[head=2]->{tower}.logits_in"
    only = patch_edges(m, clean, corrupt, g.mask([edge]), graph=g)
    key = f"{tower}.logits_in"
    expected = m.run(clean, {key: cp.Patch(cp.Cache({key: m.capture(clean, key)[key] + _head_diff(m, clean, corrupt, tower)},
                                                    {key: ()}))}).output
    torch.testing.assert_close(only, expected, atol=1e-5, rtol=1e-5)
    assert (only - c).abs().max() > 1e-3


def _head_diff(m, clean, corrupt, tower: str, layer: int = 1, head: int = 2) -> torch.Tensor:
    """Head ``head``'s write at ``layer``, corrupt minus clean, ``[rows, pos, d]``."""
    key = f"{tower}.head_out.{layer}"
    return m.capture(corrupt, key)[key][:, :, head] - m.capture(clean, key)[key][:, :, head]


@pytest.fixture(scope="module")
def scores(pair):
    return {(lib, t): eap(pair[lib], *pair_of_inputs(t), metric, graph=edge_graph(pair[lib], tower=t))
            for lib in LIBS for t in TOWERS}


@pytest.mark.parametrize("tower", TOWERS)
def test_eap_agrees_between_libraries(scores, tower):
    a, b = (np.asarray(scores[lib, tower].values, dtype=np.float64) for lib in LIBS)
    assert np.abs(a).max() > 1e-2 and np.count_nonzero(a) > len(a) // 2
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * np.abs(a).max())


@pytest.mark.parametrize("tower", TOWERS)
def test_eap_of_the_readout_edges_is_first_order(pair, scores, tower):
    """An edge into logits_in scores (ablated - clean sender) . d metric / d logits_in, summed over positions
    and averaged over rows: checked by hand for one head; the embeddings' edge is exactly 0 (the pooled position's
    embedding, class token or end token, is the same in both runs)."""
    m = pair["open_clip"]
    clean, corrupt = pair_of_inputs(tower)
    g = edge_graph(m, tower=tower)
    tap = _Tap()
    (grad,) = torch.autograd.grad(metric(m.run(clean, {f"{tower}.logits_in": tap}, grad=True).output).sum(), [tap.delta])
    expected = float((_head_diff(m, clean, corrupt, tower) * grad).sum()) / grad.shape[0]
    values = scores["open_clip", tower].values
    assert float(values[g.index(f"{tower}.head_out.1[head=2]->{tower}.logits_in")]) == pytest.approx(expected, rel=1e-4)
    assert abs(expected) > 1e-3
    assert float(values[g.index(f"{tower}.embed->{tower}.logits_in")]) == 0


def test_eap_ig_and_acdc_run_and_agree(pair):
    """One tower each: EAP-IG with one step is EAP; ACDC keeps a circuit whose patched metric it reports."""
    tower = "vision"
    clean, corrupt = pair_of_inputs(tower)
    results = {}
    for lib in LIBS:
        m = pair[lib]
        g = edge_graph(m, tower=tower)
        ig = eap_ig(m, clean, corrupt, metric, steps=1, graph=g)
        np.testing.assert_allclose(ig.values, eap(m, clean, corrupt, metric, graph=g).values, rtol=1e-5, atol=1e-7)
        circuit = acdc(m, clean, corrupt, metric, threshold=0.05, graph=g, batch_size=256)
        kept = np.asarray(circuit.values)
        assert 0 < kept.sum() < len(g)
        mask = torch.as_tensor(1 - kept, dtype=torch.float32)  # removed edges are patched
        final = float(metric(patch_edges(m, clean, corrupt, mask, graph=g)).double().mean())
        assert circuit.metadata["final_metric"] == pytest.approx(final, abs=1e-5)
        results[lib] = kept
    # the same circuit on both libraries (decisions are threshold comparisons, far from the float32 noise here)
    agree = (results["open_clip"] == results["hf"]).mean()
    assert agree > 0.95


@pytest.mark.parametrize("variant", [{"ls_init_value": 0.5}, {"qk_norm": True}, {"scale_heads": True, "scale_attn_inner": True}],
                         ids=["layer_scale", "custom_qk_norm", "custom_head_scale_inner_norm"])
def test_open_clip_block_variants(variant):
    """LayerScale and open_clip's custom attention (q/k norms, head scale, inner norm): head_in reads the block
    input, a self-patch is exact, head_out is its head_z mapped (LayerScale included), and edge patching
    reaches both ends."""
    m = cp.wrap(tiny_open_clip(**variant))
    clean, corrupt = pair_of_inputs("vision")
    cache = m.capture(clean, ["vision.head_in.1", "vision.resid_pre.1", "vision.head_z.1", "vision.head_out.1"])
    head_in = cache["vision.head_in.1"]
    assert torch.equal(head_in, cache["vision.resid_pre.1"][:, :, None, None].expand_as(head_in))
    plain = m.run(clean).output
    assert torch.equal(m.run(clean, {"vision.head_in.1": cp.Patch(cache)}).output, plain)
    mapped = m.catalog.family("vision.head_out").linear_from.apply(cache["vision.head_z.1"], 1)
    torch.testing.assert_close(mapped, cache["vision.head_out.1"], atol=1e-6, rtol=1e-6)
    g = edge_graph(m, tower="vision")
    out = patch_edges(m, clean, corrupt, torch.stack([torch.ones(len(g)), torch.zeros(len(g))]), graph=g)
    torch.testing.assert_close(out[:2], m.run(corrupt).output, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[2:], plain, atol=1e-5, rtol=1e-5)


def test_a_graph_of_the_candidate_tower_is_refused_with_the_reason(pair):
    clean, corrupt = pair_of_inputs("vision")  # 2 images are the rows, 3 texts the candidates
    g = edge_graph(pair["open_clip"], tower="text")
    with pytest.raises(ValueError, match="the graph's tower must be the one whose inputs are the rows"):
        patch_edges(pair["open_clip"], clean, corrupt, torch.ones(len(g)), graph=g)
