"""Transcoders reading the MLP's normed input (GemmaScope's layout) in attribution graphs: the features are the
encoding of what the MLP's first projection reads (a hook on it is the oracle), the replacement model reproduces the
clean logits, every edge is a finite difference of the frozen model, and feature edits in the real model encode the
live norm output (float64, tiny GPT-2 with LayerNorm and tiny Llama with RMSNorm)."""

from __future__ import annotations

import contextlib

import pytest
import torch

import crosspatch as cp
from crosspatch.methods.attribution_graph import attribution_graph, feature_intervention
from crosspatch.methods.attribution_graph.qk import qk_attribution
from crosspatch.methods.attribution_graph.replacement import clean_state, direct_run, replacement_run

from test_attribution_graph import models, random_transcoder
from test_attribution_qk import node_write


@contextlib.contextmanager
def mlp_reads(model):
    """``reads[L]``: what layer ``L``'s MLP projection reads (the norm's output, after every hook on the norm)."""
    reads: dict[int, list[torch.Tensor]] = {}
    if model.config.model_type == "gpt2":
        firsts = [blk.mlp.c_fc for blk in model.transformer.h]
    else:
        firsts = [layer.mlp.gate_proj for layer in model.model.layers]

    def hook(L):
        def fn(module, args):
            reads.setdefault(L, []).append(args[0].detach().clone())
        return fn

    handles = [mod.register_forward_pre_hook(hook(L)) for L, mod in enumerate(firsts)]
    try:
        yield reads
    finally:
        for h in handles:
            h.remove()


@pytest.fixture(params=["gpt2", "llama"])
def case(request):
    model = cp.wrap(models()[request.param]())
    torch.manual_seed(11)
    ids = torch.randint(1, 100, (1, 5))
    tc = random_transcoder(64, 2, cross_layer=request.param == "llama")
    tc.normalized_input = True
    with torch.no_grad():  # the normed input is O(1) per dimension: thresholds that leave a few features on
        tc.threshold.fill_(0.6)
    return model, tc, ids


@torch.no_grad()
def test_features_read_the_norm_output_and_the_replacement_model_is_exact(case):
    m, tc, ids = case
    with mlp_reads(m.module) as reads:
        clean = m.run(ids).output
    state = clean_state(m, tc, ids)
    assert {L: n.name for L, n in state.input_norms.items()} and all(
        ("ln_2" in n.name or "post_attention_layernorm" in n.name) for n in state.input_norms.values())
    for L, i in state.source_of.items():
        expected = tc.pre_activation(i, reads[L][0][0])
        assert torch.allclose(state.pre[L], expected, atol=1e-12, rtol=0)
        assert not torch.allclose(state.pre[L], tc.pre_activation(i, state.mlp_in[L]))  # the norm matters here
    assert sum(int((f != 0).sum()) for f in state.features.values()) >= 6
    logits = replacement_run(state).output
    assert torch.allclose(logits, clean, atol=1e-10, rtol=0)
    broken = replacement_run(state, feature_edits={0: torch.ones_like(state.features[0])[None]}).output
    assert not torch.allclose(broken, clean, atol=1e-6)
    # QK attribution with a normed-input transcoder: the terms still sum to the score
    res = qk_attribution(m, tc, ids, 1, 0, -1, 1)
    assert abs(res.total() - res.score) < 1e-6 * max(1.0, abs(res.score))
    assert "feature" in res.kinds


def _values(m, state, graph, rows_run) -> torch.Tensor:
    """Every feature's pre-activation input (the MLP projection's input times ``W_enc``) and every target's value."""
    with mlp_reads(m.module) as reads:
        run = rows_run()
    tc, out = state.tc, []
    for L, p, f in graph.features.tolist():
        out.append(reads[L][0][0, p] @ tc.W_enc[state.source_of[L]][:, f])
    for t in graph.targets:
        out.append(t.value(run.cache[t.site])[0])
    return torch.stack(out).detach()


@torch.no_grad()
def test_every_edge_is_a_finite_difference_of_the_frozen_model(case):
    m, tc, ids = case
    graph = attribution_graph(m, tc, ids, batch_size=7)
    state = clean_state(m, tc, ids)
    sites = sorted({t.site for t in graph.targets})
    base = _values(m, state, graph, lambda: direct_run(state, capture=sites))
    P = state.n_pos
    rows = list(range(graph.n_features)) + [graph.target_index(k) for k in range(len(graph.targets))]
    A = graph.dense()
    for s in range(graph.n_features + graph.n_errors + graph.n_pos):
        kind = graph.kind(s)
        if kind == "feature":
            L, p, f = graph.features[s].tolist()
        elif kind == "error":
            L, p, f = graph.layers[(s - graph.n_features) // P], (s - graph.n_features) % P, -1
        else:
            L, p, f = -1, s - graph.n_features - graph.n_errors, -1
        emb, mlp = node_write(state, kind, L, p, f)
        after = _values(m, state, graph, lambda: direct_run(state, embed_delta=emb, mlp_delta=mlp, capture=sites))
        column = A[rows, s]
        scale = max(1.0, float(A.abs().max()))
        assert torch.allclose(after - base, column, atol=1e-4 * scale, rtol=0), (kind, s)
    assert int((A[: graph.n_features, : graph.n_features] != 0).sum()) > 0  # feature-to-feature edges exist


@torch.no_grad()
def test_feature_edits_encode_the_live_norm_output(case):
    m, tc, ids = case
    with mlp_reads(m.module) as reads:
        clean = m.run(ids, capture=["mlp_out.0"])
    pre = tc.encode(0, reads[0][0])[0]  # [pos, n_features], the live norm output encoded
    # transformers' RMSNorm computes in float32 inside a float64 model; the edit's closed form is float64
    tol = 1e-10 if m.module.config.model_type == "gpt2" else 1e-6
    p, f = (int(v) for v in (pre != 0).nonzero()[0])
    same = feature_intervention(m, tc, ids, [(0, p, f, float(pre[p, f]))], capture=["mlp_out.0"])
    assert torch.allclose(same.output, clean.output, atol=tol, rtol=0)
    edited = feature_intervention(m, tc, ids, [(0, p, f, 2.0)], capture=["mlp_out.0"])
    expected = clean.cache["mlp_out.0"].clone()
    expected[0, p] += (2.0 - pre[p, f]) * tc.decoder(0, 0)[f]
    assert torch.allclose(edited.cache["mlp_out.0"], expected, atol=tol, rtol=0)
    assert not torch.allclose(edited.output, clean.output, atol=1e-3)


@torch.no_grad()
def test_a_gemma_scope_folder_loads_into_a_graph(tmp_path):
    """``params.npz`` per layer (GemmaScope's layout: ``W_enc [d, F]``, reading ``ln2.hook_normalized``) loads with
    ``normalized_input`` and gives an exact replacement model and a graph whose feature rows are finite differences."""
    import numpy as np

    from crosspatch.trainable.transcoder_formats import load_gemma_scope

    m = cp.wrap(models()["gpt2"]())
    gen = np.random.default_rng(3)
    paths = []
    for L in range(2):
        params = {"W_enc": 0.2 * gen.normal(size=(64, 24)), "W_dec": 0.2 * gen.normal(size=(24, 64)),
                  "b_enc": 0.2 * gen.normal(size=24), "b_dec": 0.2 * gen.normal(size=64),
                  "threshold": np.full(24, 0.6)}
        (tmp_path / f"layer_{L}").mkdir()
        np.savez(tmp_path / f"layer_{L}" / "params.npz", **params)
        paths.append(tmp_path / f"layer_{L}" / "params.npz")
    tc = load_gemma_scope(paths, dtype=torch.float64)
    assert tc.normalized_input
    ids = torch.randint(1, 100, (1, 5), generator=torch.Generator().manual_seed(2))
    state = clean_state(m, tc, ids)
    assert torch.allclose(replacement_run(state).output, m.run(ids).output, atol=1e-10, rtol=0)
    graph = attribution_graph(m, tc, ids)
    assert graph.n_features > 0
    with mlp_reads(m.module) as reads:
        direct_run(state)
    # a layer-1 feature's row: its input moves with a layer-0 feature's write exactly as the edge says
    L1 = (graph.features[:, 0] == 1).nonzero()[:, 0]
    L0 = (graph.features[:, 0] == 0).nonzero()[:, 0]
    A = graph.dense()
    block = A[L1][:, L0].abs()
    k = int(block.argmax())
    t, s = int(L1[k // block.shape[1]]), int(L0[k % block.shape[1]])
    assert float(A[t, s].abs()) > 1e-3  # a real edge, not a zero
    L, p, f = graph.features[s].tolist()
    emb, mlp = node_write(state, "feature", L, p, f)
    with mlp_reads(m.module) as moved:
        direct_run(state, embed_delta=emb, mlp_delta=mlp)
    _, pt, ft = graph.features[t].tolist()
    w = tc.W_enc[1][:, ft]
    change = float((moved[1][0][0, pt] - reads[1][0][0, pt]) @ w)
    assert abs(change - float(A[t, s])) < 1e-8 * max(1.0, abs(change))
