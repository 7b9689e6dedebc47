"""Attribution graphs: the replacement model is exact, every edge is a finite difference of the frozen model,
influence is the closed form, on tiny GPT-2 (LayerNorm) and tiny Llama (RMSNorm, grouped-query attention)."""

from __future__ import annotations

import pytest
import torch

import crosspatch as cp
from crosspatch.methods.attribution_graph import attribution_graph, direction_target, logit_diff
from crosspatch.methods.attribution_graph.replacement import clean_state, direct_run, replacement_run
from crosspatch.trainable.transcoder import Transcoder


def random_transcoder(d: int, layers: int, n_features: int = 16, *, cross_layer: bool, kind: str = "jumprelu",
                      seed: int = 0, skip: bool = False) -> Transcoder:
    """Random weights with thresholds that leave a few features on per position (no training needed)."""
    gen = torch.Generator().manual_seed(seed)
    tc = Transcoder(d, d, n_features, [f"mlp_in.{L}" for L in range(layers)], [f"mlp_out.{L}" for L in range(layers)],
                    cross_layer=cross_layer, kind=kind, k=4 if kind == "topk" else None, skip=skip,
                    dtype=torch.float64)
    with torch.no_grad():
        for p in tc.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=gen, dtype=torch.float64))
        tc.threshold.fill_(0.25)
    return tc


def models():
    from conftest import randomize, tiny_gpt2, tiny_llama

    return {"gpt2": lambda: randomize(tiny_gpt2()).double(), "llama": lambda: randomize(tiny_llama()).double()}


@pytest.fixture(params=["gpt2", "llama"])
def setup(request):
    model = cp.wrap(models()[request.param]())
    torch.manual_seed(5)
    ids = torch.randint(1, 100, (1, 5))
    return model, ids


@torch.no_grad()
def _target_values(state, graph, run) -> torch.Tensor:
    """Every feature's pre-activation input and every target's value in ``run`` (row 0)."""
    tc, out = state.tc, []
    for L, p, f in graph.features.tolist():
        out.append(run.cache[f"mlp_in.{L}"][0, p] @ tc.W_enc[state.source_of[L]][:, f])
    for t in graph.targets:
        out.append(t.value(run.cache[t.site])[0])
    return torch.stack(out).detach()


def _finite_difference_columns(state, graph) -> torch.Tensor:
    """``A[:, s]`` for every source by one intervention each: the source's write added (delta = 1) with every MLP
    output held at its clean value, the change of every feature input and target read off (exact: it is linear)."""
    rows = list(range(graph.n_features)) + [graph.target_index(k) for k in range(len(graph.targets))]
    sites = sorted({f"mlp_in.{L}" for L in graph.features[:, 0].tolist()} | {t.site for t in graph.targets})
    base = _target_values(state, graph, direct_run(state, capture=sites))
    P, d = state.n_pos, state.embed.shape[-1]
    cols = torch.zeros(graph.n_nodes, graph.n_nodes, dtype=torch.float64)
    for s in range(graph.n_features + graph.n_errors + graph.n_pos):
        kind = graph.kind(s)
        mlp, emb = {}, None
        if kind == "feature":
            L, p, f = graph.features[s].tolist()
            i = state.source_of[L]
            for W in state.source_writes(L):
                delta = torch.zeros(1, P, d, dtype=torch.float64)
                delta[0, p] = graph.activations[s] * state.tc.decoder(i, state.output_of[W])[f].detach()
                mlp[W] = delta
        elif kind == "error":
            L, p = graph.layers[(s - graph.n_features) // P], (s - graph.n_features) % P
            mlp[L] = torch.zeros(1, P, d, dtype=torch.float64)
            mlp[L][0, p] = state.error[L][p]
        else:
            p = s - graph.n_features - graph.n_errors
            emb = torch.zeros(1, P, d, dtype=torch.float64)
            emb[0, p] = state.embed[p]
        after = _target_values(state, graph, direct_run(state, embed_delta=emb, mlp_delta=mlp, capture=sites))
        cols[rows, s] = after - base
    return cols


VARIANTS = pytest.mark.parametrize("cross_layer, skip", [(False, False), (True, False), (False, True)],
                                   ids=["plt", "clt", "plt-skip"])


@VARIANTS
def test_replacement_model_reproduces_the_clean_logits(setup, cross_layer, skip):
    m, ids = setup
    tc = random_transcoder(64, 2, cross_layer=cross_layer, skip=skip)
    state = clean_state(m, tc, ids)
    assert sum(int((f != 0).sum()) for f in state.features.values()) > 10  # the transcoder is not idle
    assert max(float(e.abs().max()) for e in state.error.values()) > 0.1  # and not exact: errors carry the rest
    logits = replacement_run(state).output[0]
    torch.testing.assert_close(logits, state.logits, rtol=0, atol=1e-10)
    # without the error nodes the replacement is another model (the check above is not vacuous)
    state.error = {L: torch.zeros_like(e) for L, e in state.error.items()}
    assert float((replacement_run(state).output[0] - state.logits).abs().max()) > 1e-3


@VARIANTS
def test_every_edge_is_a_finite_difference_of_the_frozen_model(setup, cross_layer, skip):
    m, ids = setup
    tc = random_transcoder(64, 2, cross_layer=cross_layer, seed=1, skip=skip)
    graph = attribution_graph(m, tc, ids, batch_size=7, progress=False)
    state = clean_state(m, tc, ids)
    A = graph.dense()
    fd = _finite_difference_columns(state, graph)
    assert graph.adjacency._nnz() > 100
    scale = float(A.abs().max())
    assert float((A - fd).abs().max()) <= 1e-4 * max(scale, 1.0)
    # causality: no edge from a later position, none into a token, none out of a target
    for k, (L, p, _) in enumerate(graph.features.tolist()):
        later = [s for s in range(graph.n_features) if graph.features[s, 1] > p]
        assert float(A[k, later].abs().sum()) == 0.0 if later else True
    assert float(A[graph.token_index(0)].abs().sum()) == 0.0
    assert float(A[:, graph.target_index(0)].abs().sum()) == 0.0


def test_custom_targets_a_logit_difference_and_a_direction(setup):
    m, ids = setup
    tc = random_transcoder(64, 2, cross_layer=False, seed=2)
    v = torch.randn(64, dtype=torch.float64)
    targets = [logit_diff(3, 7, 100, dtype=torch.float64), direction_target("resid_post.0", 2, v)]
    graph = attribution_graph(m, tc, ids, targets=targets, progress=False)
    state = clean_state(m, tc, ids)
    fd = _finite_difference_columns(state, graph)
    A = graph.dense()
    for k in range(2):
        row = graph.target_index(k)
        torch.testing.assert_close(A[row], fd[row], rtol=1e-6, atol=1e-8)
    # resid_post.0 at position 2 is read before layer 1: nothing of layer 1 and no later position reaches it
    later = [s for s in range(graph.n_features) if graph.features[s, 0] == 1 or graph.features[s, 1] > 2]
    assert float(A[graph.target_index(1), later].abs().sum()) == 0.0


def test_batch_size_and_source_chunks_do_not_change_the_graph(setup):
    m, ids = setup
    tc = random_transcoder(64, 2, cross_layer=True, seed=3)
    a = attribution_graph(m, tc, ids, batch_size=64, progress=False).dense()
    b = attribution_graph(m, tc, ids, batch_size=3, source_chunk=5, progress=False).dense()
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_default_targets_cover_the_probability_mass(setup):
    m, ids = setup
    tc = random_transcoder(64, 2, cross_layer=False)
    graph = attribution_graph(m, tc, ids, progress=False)
    probs = [t.probability for t in graph.targets]
    assert probs == sorted(probs, reverse=True) and len(probs) <= 10
    assert sum(probs) >= 0.95 or len(probs) == 10
    assert sum(probs[:-1]) < 0.95


def test_the_frozen_model_is_linear_and_keeps_patterns_and_norms(setup):
    """Perturbing the embeddings of the frozen model changes the logits linearly (the real model does not):
    the patterns and norm scales are the clean run's."""
    m, ids = setup
    tc = random_transcoder(64, 2, cross_layer=False)
    state = clean_state(m, tc, ids)
    gen = torch.Generator().manual_seed(0)
    u, v = (torch.randn(1, ids.shape[1], 64, generator=gen, dtype=torch.float64) for _ in range(2))
    base = direct_run(state).output
    du = direct_run(state, embed_delta=u).output - base
    dv = direct_run(state, embed_delta=v).output - base
    duv = direct_run(state, embed_delta=3 * u - 2 * v, capture=["attn_pattern.1"])
    torch.testing.assert_close(duv.output - base, 3 * du - 2 * dv, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(duv.cache["attn_pattern.1"][:1], state.patterns[1], rtol=0, atol=0)
    real = m.run(state.inputs, {"embed": lambda x: x + 3 * u - 2 * v}).output
    assert float((real - base - (3 * du - 2 * dv)).abs().max()) > 1e-3  # the unfrozen model is not linear


def test_a_feature_cap_computes_the_most_influential_rows_exactly(setup):
    m, ids = setup
    tc = random_transcoder(64, 2, cross_layer=False, seed=6)
    full = attribution_graph(m, tc, ids, progress=False)
    capped = attribution_graph(m, tc, ids, max_feature_nodes=5, batch_size=2, progress=False)
    A, C = full.dense(), capped.dense()
    rows = C.abs().sum(1).nonzero()[:, 0]
    feature_rows = rows[rows < full.n_features]
    assert len(feature_rows) <= 5 and capped.metadata["feature_rows"] == len(feature_rows)
    torch.testing.assert_close(C[rows], A[rows], rtol=1e-10, atol=1e-15)  # the full graph's rows (batching aside)
    for k in range(len(full.targets)):
        torch.testing.assert_close(C[full.target_index(k)], A[full.target_index(k)], rtol=1e-10, atol=1e-15)
    # the first batch visited holds the two features the targets' own rows say are most influential
    from crosspatch.methods.attribution_graph.influence import influence, normalize

    only_targets = A.clone()
    only_targets[: full.n_features] = 0
    first = influence(normalize(only_targets), full.target_weights())[: full.n_features].argsort(descending=True)[:2]
    assert set(first.tolist()) <= set(feature_rows.tolist())


def test_a_transcoder_over_some_layers_leaves_the_others_as_error_nodes(setup):
    m, ids = setup
    tc = Transcoder(64, 64, 16, ["mlp_in.1"], ["mlp_out.1"], dtype=torch.float64)
    with torch.no_grad():
        for p in tc.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64))
        tc.threshold.fill_(0.25)
    graph = attribution_graph(m, tc, ids, progress=False)
    state = clean_state(m, tc, ids)
    assert set(graph.features[:, 0].tolist()) == {1} and graph.layers == [0, 1]
    torch.testing.assert_close(state.error[0], state.mlp_out[0], rtol=0, atol=0)  # layer 0 is all error
    torch.testing.assert_close(replacement_run(state).output[0], state.logits, rtol=0, atol=1e-10)
    A, fd = graph.dense(), _finite_difference_columns(state, graph)
    assert float((A - fd).abs().max()) <= 1e-4 * max(float(A.abs().max()), 1.0)


@VARIANTS
def test_paths_through_the_graph_are_the_replacement_models_response(setup, cross_layer, skip):
    """Summing every path, ``[(I - M)^-1]`` (``M``: the adjacency per unit of each source feature), gives what
    the local replacement model does when a feature is edited: the later features respond through their
    frozen masks and the targets move by exactly that."""
    m, ids = setup
    tc = random_transcoder(64, 2, cross_layer=cross_layer, seed=10, skip=skip)
    graph = attribution_graph(m, tc, ids, progress=False)
    state = clean_state(m, tc, ids)
    A = graph.dense()
    M = A.clone()
    M[:, : graph.n_features] /= graph.activations[None]
    total = torch.linalg.inv(torch.eye(graph.n_nodes, dtype=A.dtype) - M)
    targets = [graph.target_index(k) for k in range(len(graph.targets))]
    base = torch.stack([t.value(state.logits[None])[0] for t in graph.targets])
    layer0 = (graph.features[:, 0] == 0).nonzero()[:, 0]
    assert len(layer0) > 0
    indirect = []
    for k in layer0[:3].tolist():
        L, p, f = graph.features[k].tolist()
        edit = torch.zeros(1, state.n_pos, tc.n_features, dtype=torch.float64)
        edit[0, p, f] = 1.5
        with torch.no_grad():
            logits = replacement_run(state, feature_edits={L: edit}, capture=["logits"]).cache["logits"]
        moved = torch.stack([t.value(logits)[0] for t in graph.targets]) - base
        torch.testing.assert_close(moved, 1.5 * total[targets, k], rtol=1e-7, atol=1e-10)
        indirect.append(float((total[targets, k] - M[targets, k]).abs().max()))
    assert max(indirect) > 1e-6  # the paths through layer 1's features count: the direct edge alone is not it
    if skip:  # the skip terms carry part of every edge: without them the graph is another one
        tc.W_skip = None
        assert float((attribution_graph(m, tc, ids, progress=False).dense() - A).abs().max()) > 1e-3
