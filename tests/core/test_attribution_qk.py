"""QK attribution: the pair terms sum to the model's own pre-softmax score, read by a hand-written query/key
computation on the real modules, and each node's terms equal the score's change when that node's write is removed
from the frozen model (float64, tiny GPT-2 with LayerNorm and tiny Llama with RMSNorm, rotary, grouped-query)."""

from __future__ import annotations

import json

import pytest
import torch

import crosspatch as cp
from crosspatch.methods.attribution_graph import attribution_graph
from crosspatch.methods.attribution_graph.qk import qk_attribution
from crosspatch.methods.attribution_graph.replacement import clean_state, direct_run

from test_attribution_graph import models, random_transcoder


class ScoreOracle:
    """The pre-softmax score of (layer, head, query, key) from the attention module's own inputs, written out by
    hand for GPT-2 (fused ``c_attn``) and Llama (``q_proj``, ``k_proj``, rotary, grouped-query)."""

    def __init__(self, model, layer: int, head: int, t: int, u: int):
        self.model, self.layer, self.head, self.t, self.u = model, layer, head, t, u
        self.scores: list[torch.Tensor] = []

    def __enter__(self):
        cfg = self.model.config
        if cfg.model_type == "gpt2":
            attn = self.model.transformer.h[self.layer].attn
            D, H = cfg.n_embd, cfg.n_head
            dh = D // H

            def hook(module, args, out):
                q = out[..., :D].unflatten(-1, (H, dh))[:, self.t, self.head]
                k = out[..., D:2 * D].unflatten(-1, (H, dh))[:, self.u, self.head]
                self.scores.append((q * k).sum(-1) / dh ** 0.5)

            self.handle = attn.c_attn.register_forward_hook(hook)
        else:
            from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

            attn = self.model.model.layers[self.layer].self_attn
            H, dh = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
            groups = H // cfg.num_key_value_heads

            def pre(module, args, kwargs):
                h = kwargs["hidden_states"]
                cos, sin = kwargs["position_embeddings"]
                q = module.q_proj(h).unflatten(-1, (-1, dh)).transpose(1, 2)
                k = module.k_proj(h).unflatten(-1, (-1, dh)).transpose(1, 2)
                q, k = apply_rotary_pos_emb(q, k, cos, sin)
                qh, kh = q[:, self.head, self.t], k[:, self.head // groups, self.u]
                self.scores.append((qh * kh).sum(-1) * dh ** -0.5)

            self.handle = attn.register_forward_pre_hook(pre, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


@pytest.fixture(params=["gpt2", "llama"])
def case(request):
    model = cp.wrap(models()[request.param]())
    torch.manual_seed(7)
    ids = torch.randint(1, 100, (1, 6))
    tc = random_transcoder(64, 2, cross_layer=request.param == "llama")  # a CLT on Llama, a PLT on GPT-2
    return model, tc, ids


def node_write(state, kind: str, L: int, p: int, f: int):
    """A node's write as (embed delta, mlp deltas) ``[1, pos, d]``: a feature's activation times its decoder into
    every MLP output it writes, an error vector, a token embedding."""
    P, d = state.n_pos, state.embed.shape[-1]
    emb, mlp = torch.zeros(1, P, d, dtype=torch.float64), {}
    if kind == "feature":
        i = state.source_of[L]
        act = state.features[L][p, f]
        for W in state.source_writes(L):
            mlp[W] = torch.zeros(1, P, d, dtype=torch.float64)
            mlp[W][0, p] = act * state.tc.decoder(i, state.output_of[W])[f].detach()
    elif kind == "error":
        mlp[L] = torch.zeros(1, P, d, dtype=torch.float64)
        mlp[L][0, p] = state.error[L][p]
    else:
        emb[0, p] = state.embed[p]
    return emb, mlp


def _write(state, res, n: int):
    return node_write(state, res.kinds[n], res.layers[n], res.positions[n], res.feature_ids[n])


@torch.no_grad()
def test_terms_sum_to_the_models_score_and_each_node_is_its_removal(case):
    m, tc, ids = case
    layer, head, t, u = 1, 2, 5, 2
    res = qk_attribution(m, tc, ids, layer, head, t, u)
    with ScoreOracle(m.module, layer, head, t, u) as oracle:
        m.run(ids)
    actual = float(oracle.scores[0][0])
    assert abs(res.score - actual) < 1e-9 * max(1.0, abs(actual))
    assert abs(res.scale - 0.25) < 1e-9  # d_head 16
    for total in (res.total(), float(res.key_terms.sum()), float(res.pairs().sum())):
        assert abs(total - actual) < 1e-6 * max(1.0, abs(actual))
    assert res.metadata["closure"] < 1e-10
    kinds = set(res.kinds)
    assert {"feature", "error", "token", "bias"} <= kinds
    assert all(L < layer for L, kd in zip(res.layers, res.kinds) if kd in ("feature", "error"))
    assert all(p <= t for p in res.positions)  # causal: later positions write nothing here

    # removal: the frozen model with one node's write taken out, its score read by the oracle
    state = clean_state(m, tc, ids)
    with ScoreOracle(m.module, layer, head, t, u) as oracle:
        direct_run(state)
    base = float(oracle.scores[0][0])
    assert abs(base - actual) < 1e-9 * max(1.0, abs(actual))  # the frozen model is exact at the clean point
    picks = {}
    for n, kd in enumerate(res.kinds[:-1]):
        side = "both" if res.positions[n] <= u else "query"
        picks.setdefault((kd, side), n)
    assert len(picks) >= 5  # features, errors and tokens on both sides and on the query side alone
    scale = max(1.0, abs(actual))
    for n in picks.values():
        emb, mlp = _write(state, res, n)
        with ScoreOracle(m.module, layer, head, t, u) as oracle:
            direct_run(state, embed_delta=-emb, mlp_delta={W: -v for W, v in mlp.items()})
        change = base - float(oracle.scores[0][0])
        assert abs(change - res.removal_effect(n)) < 1e-6 * scale, (res.labels[n], change, res.removal_effect(n))
        if res.positions[n] > u:  # a node after the key writes the query side only
            assert float(res.k[n].abs().max()) == 0.0
            assert abs(change - float(res.query_terms[n])) < 1e-6 * scale


@torch.no_grad()
def test_pairs_are_bilinear_over_two_nodes(case):
    """Removing two nodes changes the score by their rows and columns minus the four pairs they share."""
    m, tc, ids = case
    layer, head, t, u = 1, 0, 4, 1
    res = qk_attribution(m, tc, ids, layer, head, t, u)
    state = clean_state(m, tc, ids)
    both = [n for n in range(res.n_nodes - 1) if res.q[n].any() and res.k[n].any()]
    a, b = both[0], both[-1]
    ea, ma = _write(state, res, a)
    eb, mb = _write(state, res, b)
    mlp = {W: -(ma.get(W, 0) + mb.get(W, 0)) for W in set(ma) | set(mb)}
    with ScoreOracle(m.module, layer, head, t, u) as oracle:
        direct_run(state)
        direct_run(state, embed_delta=-(ea + eb), mlp_delta=mlp)
    change = float(oracle.scores[0][0] - oracle.scores[1][0])
    rows_cols = sum(float(res.query_terms[n] + res.key_terms[n]) for n in (a, b))
    shared = res.pair(a, a) + res.pair(b, b) + res.pair(a, b) + res.pair(b, a)
    assert abs(change - (rows_cols - shared)) < 1e-6 * max(1.0, abs(res.score))


def test_graph_indices_results_and_errors(case):
    m, tc, ids = case
    graph = attribution_graph(m, tc, ids)
    res = qk_attribution(m, tc, ids, 1, 1, -1, 0, graph=graph)
    for n, kd in enumerate(res.kinds[:-1]):
        gi = res.graph_index[n]
        assert graph.kind(gi) == kd
        if kd == "feature":
            assert graph.features[gi].tolist() == [res.layers[n], res.positions[n], res.feature_ids[n]]
        elif kd == "error":
            assert gi == graph.error_index(res.layers[n], res.positions[n])
        else:
            assert gi == graph.token_index(res.positions[n])
    top = res.top_pairs(5, chunk=3)  # chunked equals the full matrix's largest entries
    full = res.pairs()
    flat = full.flatten().abs().topk(5).values
    assert torch.allclose(torch.tensor([abs(v) for _, _, v in top], dtype=torch.float64), flat)
    assert all(abs(full[i, j] - v) < 1e-12 for i, j, v in top)
    d = json.loads(json.dumps(res.to_dict(top=5)))
    assert len(d["nodes"]) == res.n_nodes and abs(d["sum_of_terms"] - d["score"]) < 1e-6
    with pytest.raises(ValueError, match="masked"):
        qk_attribution(m, tc, ids, 1, 0, 1, 3)
    with pytest.raises(ValueError, match="head 9"):
        qk_attribution(m, tc, ids, 1, 9, 3, 1)
    other = torch.randint(1, 100, (1, 6), generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match="not this prompt's graph"):
        qk_attribution(m, tc, other, 1, 0, 3, 1, graph=graph)


def test_rows_and_forwards_give_the_same_parts(case):
    """The default (``2 d_head`` graph rows by backward passes) and one frozen forward per node agree."""
    m, tc, ids = case
    rows = qk_attribution(m, tc, ids, 1, 3, -1, 2)
    fwd = qk_attribution(m, tc, ids, 1, 3, -1, 2, method="forward", batch_size=5)
    assert rows.labels == fwd.labels and rows.graph_index == fwd.graph_index
    assert torch.allclose(rows.q, fwd.q, atol=1e-10, rtol=0) and torch.allclose(rows.k, fwd.k, atol=1e-10, rtol=0)
    assert rows.metadata["closure"] < 1e-10 and fwd.metadata["closure"] < 1e-10
