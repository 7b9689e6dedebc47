"""CD-T's circuit search on a tiny GPT-2: its edge scores are cp.cdt's relevances, ``direct`` keeps the parts'
sum and reads a sender's own write; at node granularity the scores are single nodes' relevances at a position and
add up to the component ones as the per-position parts imply."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import crosspatch as cp
from conftest import randomize, tiny_gpt2
from crosspatch.methods.cdt import decompose
from crosspatch.methods.cdt_circuit import cdt_circuit, receiver_target
from crosspatch.methods.cdt_circuit_nodes import at_position, node_scores, to_components, without_position
from crosspatch.methods.edges import edge_graph
from crosspatch.sites.site import Site


@pytest.fixture(scope="module")
def setup():
    m = cp.wrap(randomize(tiny_gpt2(initializer_range=0.2)))
    torch.manual_seed(1)
    ids = torch.randint(2, 100, (3, 7))
    metric = cp.metrics.logit_diff(ids[:, -1], (ids[:, -1] + 1) % 100)
    return m, ids, metric


def test_direct_keeps_the_sum_and_reads_the_senders_write(setup):
    m, ids, _ = setup
    dec = decompose(m, ids, [["embed"], ["mlp_out.0"], ["head_out.0[head=1]"]], "all", direct=True, progress=False)
    keys = [k for k in dec.rel if k.split(".")[0] in m.catalog and not k.startswith("head_in")]
    cache = m.capture(ids, keys)
    for key in keys:
        torch.testing.assert_close(dec.total(key), cache[key][None].expand_as(dec.total(key)), atol=1e-5, rtol=0)
    for j, key in enumerate(["embed", "mlp_out.0"]):  # every later head and MLP cut: logits_in holds the write alone
        torch.testing.assert_close(dec.rel["logits_in"][j], cache[key], atol=1e-5, rtol=0)


def test_edge_scores_are_cdt_relevances(setup):
    m, ids, metric = setup
    res = cdt_circuit(m, ids, metric, threshold=0.0, paths="all", progress=False)
    score = dict(zip(res.coords["edge"], res.values))
    assert len(res.metadata["scored"]) == len(res.values)  # threshold 0: every receiver is searched
    full = cp.cdt(m, ids, [["mlp_out.1"], ["head_out.0[head=1]"]], metric, progress=False)
    share = full.values / full.metadata["full"]
    assert score["mlp_out.1->logits_in"] == pytest.approx(share[0], rel=1e-5)
    assert score["head_out.0[head=1]->logits_in"] == pytest.approx(share[1], rel=1e-5)
    for edge in ("embed->head_in.1[qkv=0,head=2]", "head_out.0[head=3]->head_in.1[qkv=1,head=0]", "mlp_out.0->mlp_in.1"):
        sender, receiver = edge.split("->")
        norm = cp.cdt(m, ids, [[sender]], target=receiver_target(receiver), progress=False)
        assert score[edge] == pytest.approx(float(norm.values[0]), rel=1e-5)
    direct = cdt_circuit(m, ids, metric, threshold=0.0, progress=False)
    d = dict(zip(direct.coords["edge"], direct.values))
    assert d["mlp_out.1->logits_in"] == pytest.approx(score["mlp_out.1->logits_in"], rel=1e-5)  # the last MLP: one path
    assert d["head_out.0[head=1]->logits_in"] != pytest.approx(score["head_out.0[head=1]->logits_in"], rel=1e-3)


def test_pruning_and_arguments(setup):
    m, ids, metric = setup
    res = cdt_circuit(m, ids, metric, threshold=10.0, progress=False)  # nothing passes: only logits_in is searched
    assert res.metadata["levels"] == [["logits_in"]] and res.metadata["kept"] == []
    assert all(e.endswith("->logits_in") for e in res.metadata["scored"])
    with pytest.raises(ValueError, match="paths"):
        cdt_circuit(m, ids, paths="some", progress=False)
    with pytest.raises(ValueError, match="receiver"):
        receiver_target("head_out.0[head=1]")


def test_grouped_query_attention_key_value_receivers():
    """A key/value head (head_in.l[qkv=1,head=a:b]) is read at its key, the same for each query head it serves."""
    from conftest import tiny_llama

    m = cp.wrap(randomize(tiny_llama()))
    ids = torch.randint(2, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    res = cdt_circuit(m, ids, threshold=0.0, paths="all", progress=False)
    assert len(res.metadata["scored"]) == len(res.values)  # every receiver reached, the key/value heads too
    score = dict(zip(res.coords["edge"], res.values))
    for head in (2, 3):
        key = cp.cdt(m, ids, [["mlp_out.0"]], target=f"head_k.1[head={head}]", progress=False)
        assert score["mlp_out.0->head_in.1[qkv=1,head=2:4]"] == pytest.approx(float(key.values[0]), rel=1e-5)


# -- node granularity: (layer, position, head) and (layer, position) MLP nodes ---------------------------------------


def _table(res):
    return dict(zip(res.coords["edge"], (float(v) for v in res.values)))


@pytest.mark.parametrize("irrel", ["zero", "mean"])
def test_direct_parts_are_per_position(setup, irrel):
    """The relation the packed node search rests on: under direct relevance a component set at every position has,
    at each position, exactly the relevant part of its node there alone (float64: to 1e-12), and a node's part is
    zero elsewhere (bit for bit)."""
    _, ids, _ = setup
    m = cp.wrap(randomize(tiny_gpt2(initializer_range=0.2)).double())
    reference = torch.randint(2, 100, (5, 7), generator=torch.Generator().manual_seed(2)) if irrel == "mean" else None
    targets = ["head_q.1", "head_k.1", "head_v.1", "mlp_act.1", "logits"]
    sets = [["head_out.0[head=2]"]] + [[f"head_out.0[pos={p},head=2]"] for p in range(7)]
    sets += [["mlp_out.0"], ["mlp_out.0[pos=4]"]]
    dec = decompose(m, ids, sets, targets, irrel=irrel, reference=reference, direct=True, progress=False)
    for t in targets:
        rel = dec.rel[t]  # [sets, prompts, pos, ...]
        assert rel[0].abs().max() > 0
        for p in range(7):
            torch.testing.assert_close(rel[1 + p][:, p], rel[0][:, p], atol=1e-12, rtol=0)
            others = [q for q in range(7) if q != p]
            assert torch.equal(rel[1 + p][:, others], torch.zeros_like(rel[1 + p][:, others])), (t, p)
        torch.testing.assert_close(rel[9][:, 4], rel[8][:, 4], atol=1e-12, rtol=0)


def test_node_shares_add_up_to_the_component_share(setup):
    """For a metric linear in the logits the component edge's share is the sum of its node edges' shares; for a norm
    share (one prompt) the squared component share times the target's squared norm is the sum over positions of the
    node shares times each position's squared norm. Both follow from the per-position parts (direct relevance)."""
    m, ids, metric = setup
    comp = _table(cdt_circuit(m, ids, metric, threshold=0.0, irrel="mean", reference=ids.flip(0), progress=False))
    node = _table(cdt_circuit(m, ids, metric, threshold=0.0, irrel="mean", reference=ids.flip(0), granularity="node",
                              progress=False))
    for sender in ("embed", "head_out.0[head=1]", "head_out.1[head=3]", "mlp_out.0", "mlp_out.1"):
        total = sum(node.get(f"{at_position(sender, p)}->logits_in[pos={p}]", 0.0) for p in range(7))
        assert total == pytest.approx(comp[f"{sender}->logits_in"], rel=1e-5, abs=1e-7)

    one = ids[:1]
    comp = _table(cdt_circuit(m, one, threshold=0.0, progress=False))
    node = _table(cdt_circuit(m, one, threshold=0.0, granularity="node", progress=False))
    whole = decompose(m, one, [[]], ["head_k.1", "mlp_act.1"], progress=False)
    for sender, receiver, target, head in (("head_out.0[head=0]", "head_in.1[qkv=1,head=2]", "head_k.1", 2),
                                           ("embed", "mlp_in.1", "mlp_act.1", None)):
        tot = whole.total(target)[0, 0]  # [pos, (head,) dim]
        tot = tot if head is None else tot[:, head]
        per_pos = tot.double().pow(2).sum(-1)
        lhs = comp[f"{sender}->{receiver}"] ** 2 * float(per_pos.sum())
        rhs = sum(node[f"{at_position(sender, p)}->{at_position(receiver, p)}"] ** 2 * float(per_pos[p]) for p in range(7))
        assert lhs == pytest.approx(rhs, rel=1e-5)


def test_node_scores_are_single_node_relevances(setup):
    """A node edge's score is the relevance of that node alone at the receiver's target at its position; with every
    path counted too (one source set per node there)."""
    m, ids, metric = setup
    for paths in ("direct", "all"):
        res = _table(cdt_circuit(m, ids, threshold=0.0, paths=paths, granularity="node", progress=False))
        checked = 0
        for sender, target, head, pos in (("head_out.0[pos=3,head=1]", "head_q.1", 2, 3),
                                          ("mlp_out.0[pos=5]", "mlp_act.1", None, 5),
                                          ("embed[pos=2]", "head_v.1", 0, 2 if paths == "direct" else 6)):
            receiver = {"head_q.1": f"head_in.1[pos={pos},qkv=0,head=2]", "mlp_act.1": f"mlp_in.1[pos={pos}]",
                        "head_v.1": f"head_in.1[pos={pos},qkv=2,head=0]"}[target]
            if f"{sender}->{receiver}" not in res:
                continue  # the search did not reach it (all paths: only receivers a kept node opens)
            dec = decompose(m, ids, [[sender]], target, direct=paths == "direct", progress=False)
            rel, tot = dec.rel[target][0][:, pos], dec.total(target)[0][:, pos]
            rel, tot = (rel, tot) if head is None else (rel[:, head], tot[:, head])
            share = (rel.double().norm(dim=-1) / tot.double().norm(dim=-1)).mean()
            assert share > 0 and res[f"{sender}->{receiver}"] == pytest.approx(float(share), rel=1e-5)
            checked += 1
        assert checked >= 2, paths


def test_node_search_batched_equals_one_source_at_a_time(setup):
    m, ids, metric = setup
    n = ids.shape[0]
    for paths in ("direct", "all"):
        one = cdt_circuit(m, ids, metric, threshold=0.02, paths=paths, granularity="node", batch_size=n, progress=False)
        many = cdt_circuit(m, ids, metric, threshold=0.02, paths=paths, granularity="node", batch_size=64 * n,
                           progress=False)
        assert one.coords["edge"] == many.coords["edge"] and one.metadata["kept"] == many.metadata["kept"]
        np.testing.assert_allclose(one.values, many.values, rtol=1e-5, atol=1e-7)


def test_node_search_is_causal_and_ranks_nodes(setup):
    """With every path counted, relevance never flows to an earlier position of a causal model (such edges are not
    listed); a kept head opens its keys and values at the positions it attends to, all earlier ones here."""
    m, ids, metric = setup
    res = cdt_circuit(m, ids, metric, threshold=0.05, paths="all", granularity="node", progress=False)
    pos = lambda name: int(Site.parse(name).selection["pos"])  # noqa: E731
    edges = [e.split("->") for e in res.coords["edge"]]
    assert edges and all(pos(s) <= pos(r) for s, r in edges)
    assert any(pos(s) < pos(r) for s, r in edges)  # attention carried some relevance forward
    ranks = node_scores(res, "edge")
    assert len(ranks.coords["node"]) == 7 * (1 + 2 * 5)
    table = dict(zip(ranks.coords["node"], ranks.values))
    kept_senders = {e.split("->")[0] for e in res.metadata["kept"]}
    assert kept_senders and all(table[s] >= 0.05 for s in kept_senders)
    comp = to_components(res, edge_graph(m))
    assert set(comp.metadata["kept"]) == {f"{without_position(a)}->{without_position(b)}" for a, b in
                                          (k.split("->") for k in res.metadata["kept"])}


def test_node_granularity_arguments(setup):
    m, ids, metric = setup
    from conftest import padded_prompts

    with pytest.raises(ValueError, match="padding"):
        cdt_circuit(m, padded_prompts(0, pad="right"), granularity="node", progress=False)
    with pytest.raises(ValueError, match="granularity"):
        cdt_circuit(m, ids, granularity="heads", progress=False)
    with pytest.raises(ValueError, match="node-level"):
        to_components(cdt_circuit(m, ids, metric, threshold=10.0, progress=False), edge_graph(m))


def test_node_search_grouped_query_attention():
    """Under grouped-query attention a key/value receiver at a position is the key/value head's input there, read at
    its first query head's key (the same key repeated); its node edges are single-node relevances there."""
    from conftest import tiny_llama

    m = cp.wrap(randomize(tiny_llama()))
    ids = torch.randint(2, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    res = _table(cdt_circuit(m, ids, threshold=0.0, granularity="node", progress=False))
    edge = "mlp_out.0[pos=4]->head_in.1[pos=4,qkv=1,head=2:4]"
    assert edge in res
    for head in (2, 3):
        dec = decompose(m, ids, [["mlp_out.0[pos=4]"]], f"head_k.1[pos=4,head={head}]", direct=True, progress=False)
        key = next(iter(dec.rel))
        share = (dec.rel[key][0].double().norm(dim=-1) / dec.total(key)[0].double().norm(dim=-1)).mean()
        assert res[edge] == pytest.approx(float(share), rel=1e-5)


@pytest.mark.parametrize("granularity", ["component", "node"])
def test_node_scores_path_rule_is_the_best_product_along_searched_paths(setup, granularity):
    """node_scores' path rule against enumerating every searched path to the output: sender -> receiver -> the kept
    node whose input that receiver is -> ... -> logits_in, the product of |edge scores| along it, the best path."""
    m, ids, metric = setup
    res = cdt_circuit(m, ids, metric, threshold=0.05, granularity=granularity, progress=False)
    opened, out = res.metadata["opened"], {}
    for edge, value in _table(res).items():
        sender, receiver = edge.split("->")
        out.setdefault(sender, []).append((receiver, abs(value)))

    def best(node):
        values = [0.0]
        for receiver, value in out.get(node, []):
            if receiver.startswith("logits_in"):
                values.append(value)
            else:
                values += [value * best(owner) for owner in opened.get(receiver, [])]
        return max(values)

    path, edge = node_scores(res), node_scores(res, "edge")
    assert path.coords["node"] == edge.coords["node"] == res.metadata["senders"]
    for node, p, e in zip(path.coords["node"], path.values, edge.values):
        assert p == pytest.approx(best(node), rel=1e-12, abs=1e-15)
        assert e == pytest.approx(max([v for _, v in out.get(node, [])] + [0.0]), rel=1e-12)
    assert any(p != pytest.approx(e) for p, e in zip(path.values, edge.values))
