"""CD-T on tracr programs: the decomposed forward is exact at every node, ``direct`` keeps the sum and reads a
sender's own write, and the circuit search recovers the compiled circuit; at node granularity it keeps every node
whose ablation moves the output."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import crosspatch as cp
from crosspatch.adapters.tracr import load, output_distance
from crosspatch.methods.cdt import decompose
from crosspatch.methods.cdt_circuit import cdt_circuit
from crosspatch.methods.cdt_circuit_nodes import at_position, to_components, without_position
from crosspatch.methods.circuit_eval import roc
from crosspatch.methods.edges import edge_graph
from crosspatch.methods.pairs import model_metric
from crosspatch.results.metrics import MetricContext

DATA = Path(__file__).resolve().parents[2] / "data" / "tracr"
PROGRAMS = ["reverse", "frac_prevs", "sort_unique", "hist"]


@pytest.fixture(scope="module", params=PROGRAMS)
def program(request):
    model = load(DATA, request.param)
    ids = torch.tensor([r["ids"] for r in model.meta["reference"] if len(r["ids"]) == 6][:6])
    return model, cp.wrap(model), ids


def _close(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference relative to the larger magnitude (compiled weights reach the hundreds)."""
    return float((a - b).abs().max() / max(1.0, float(b.abs().max())))


@pytest.mark.parametrize("direct", [False, True])
def test_parts_sum_to_the_model_at_every_node(program, direct):
    model, m, ids = program
    sets = [["embed"], ["head_out.0[head=0]"], ["mlp_out.0[pos=2]"], ["embed[pos=1]", "mlp_out.0"], []]
    dec = decompose(m, ids, sets, "all", direct=direct, progress=False)
    keys = [k for k in dec.rel if k.split(".")[0] in m.catalog]
    cache = m.capture(ids, keys)
    assert len(keys) >= 4 * model.n_layers
    for key in keys:
        assert _close(dec.total(key), cache[key][None].expand_as(dec.total(key))) < 1e-5, key
    for key in dec.rel:  # no source: nothing is relevant (the relevant pattern of zero scores is the uniform one)
        if not key.startswith("attn_pattern"):
            assert torch.equal(dec.rel[key][4], torch.zeros_like(dec.rel[key][4])), key
    if not direct:  # the whole embedding as the source: nothing is context anywhere
        assert all(torch.equal(dec.irrel[k][0], torch.zeros_like(dec.irrel[k][0])) for k in dec.rel)


def test_direct_reads_a_senders_own_write(program):
    """With every later head and MLP cut, the relevance at logits_in is the source's write itself."""
    model, m, ids = program
    last = model.n_layers - 1
    dec = decompose(m, ids, [["embed"], ["mlp_out.0"], [f"mlp_out.{last}"]], "logits_in", direct=True, progress=False)
    cache = m.capture(ids, ["embed", "mlp_out.0", f"mlp_out.{last}"])
    for j, key in enumerate(["embed", "mlp_out.0", f"mlp_out.{last}"]):
        assert _close(dec.rel["logits_in"][j], cache[key]) < 1e-6
    every = decompose(m, ids, [["embed"]], "logits_in", progress=False)  # every path: the embedding is everything
    assert torch.equal(every.irrel["logits_in"][0], torch.zeros_like(every.irrel["logits_in"][0]))


def test_circuit_search_recovers_the_compiled_circuit(program):
    model, m, ids = program
    truth = set(model.circuit_edges)
    res = cdt_circuit(m, ids, threshold=0.05, progress=False)
    assert set(res.metadata["kept"]) == truth
    assert roc(res, truth).metadata["auc"] == 1.0
    scored = set(res.metadata["scored"])
    assert all(v == 0 for e, v in zip(res.coords["edge"], res.values) if e not in scored)  # pruned: never decomposed
    assert scored < set(res.coords["edge"]) or model.program == "hist"  # the pruning saved work (hist has 8 edges)
    every = cdt_circuit(m, ids, threshold=0.05, paths="all", progress=False)  # the paper's: every path counts
    assert truth <= set(every.metadata["kept"])


def test_node_search_keeps_every_functional_node(program):
    """Ground truth with positions: a node is functional when zeroing it alone moves the output (KL > 1e-6, summed
    over positions). The node search keeps every functional node, and collapsed onto the component graph it keeps
    only compiled edges; a compiled edge it drops starts or ends at a head or MLP inert at every position on these
    inputs (reverse: the length head, on inputs of one length)."""
    model, m, ids = program
    g = edge_graph(m)
    res = cdt_circuit(m, ids, threshold=0.05, granularity="node", progress=False)
    metric = model_metric(m, output_distance(model.categorical))
    clean = m.run(ids).output
    ctx = MetricContext(torch.arange(len(ids)), clean, None)
    nodes = [at_position(s, p) for s in g.senders for p in range(ids.shape[1])]
    with torch.inference_mode():
        effect = {node: float(metric(m.run(ids, {node: cp.Zero()}).output, ctx).mean()) for node in nodes}
    functional = {node for node, value in effect.items() if value > 1e-6}
    kept = {edge.split("->")[0] for edge in res.metadata["kept"]}
    assert functional and functional <= kept
    truth = set(model.circuit_edges)
    collapsed = set(to_components(res, g).metadata["kept"])
    assert collapsed <= truth
    inert = {c for c in g.senders if all(effect[n] <= 1e-6 for n in nodes if without_position(n) == c)}
    for edge in truth - collapsed:
        sender, receiver = edge.split("->")
        site = cp.Site.parse(receiver)
        node = {"head_in": f"head_out.{site.layer}[head={site.selection.get('head')}]", "mlp_in": f"mlp_out.{site.layer}"}
        assert sender in inert or node.get(site.family) in inert, edge
