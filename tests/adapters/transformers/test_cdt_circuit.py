"""CD-T's circuit search on a tiny GPT-2: its edge scores are cp.cdt's relevances, ``direct`` keeps the parts'
sum and reads a sender's own write."""

from __future__ import annotations

import pytest
import torch

import crosspatch as cp
from conftest import randomize, tiny_gpt2
from crosspatch.methods.cdt import decompose
from crosspatch.methods.cdt_circuit import cdt_circuit, receiver_target


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
