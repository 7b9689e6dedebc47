"""Edge graphs on tiny GPT-2: exact edge patching, EAP / EAP-IG and ACDC recovering known edges."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import crosspatch as cp
from conftest import randomize, tiny_gpt2
from crosspatch.engine.interventions import Patch
from crosspatch.methods.edge_paths import connected
from crosspatch.methods.edges import EdgePatcher, acdc, acdc_sweep, eap, eap_ig, edge_graph, patch_edges
from test_inputs import with_inputs


def _model(**kw):
    return with_inputs(randomize(tiny_gpt2(**kw)))


@pytest.fixture(scope="module")
def m():
    return _model()


def _pair():
    torch.manual_seed(2)
    clean = torch.randint(2, 100, (3, 7))
    corrupt = clean.clone()
    corrupt[:, 2] = (clean[:, 2] + 17) % 98 + 2
    corrupt[:, -1] = (clean[:, -1] + 31) % 98 + 2
    return clean, corrupt


def test_graph_is_topological(m):
    g = edge_graph(m)
    assert g.senders[0] == "embed" and g.receivers[-1] == "logits_in"
    # 2 layers x 4 heads: senders 1 + (4 + 1) * 2 = 11; receivers 2 * (12 + 1) + 1 = 27
    assert len(g.senders) == 11 and len(g.receivers) == 27
    assert "head_out.0[head=1]->mlp_in.0" in g.edge_names and "head_out.1[head=0]->head_in.1[qkv=0,head=0]" not in g.edge_names
    assert "mlp_out.0->head_in.1[qkv=2,head=3]" in g.edge_names and "mlp_out.0->mlp_in.0" not in g.edge_names
    nodes = g.nodes
    assert nodes.index("embed") < nodes.index("head_in.0[qkv=0,head=0]") < nodes.index("head_out.0[head=0]")
    assert nodes.index("mlp_in.0") < nodes.index("mlp_out.0") < nodes.index("head_in.1[qkv=0,head=0]")
    stage = [g._stage(g.receivers[r]) for _, r in g.edges]
    assert stage == sorted(stage)


def test_all_edges_is_corrupt_none_is_clean(m):
    clean, corrupt = _pair()
    g = edge_graph(m)
    out = patch_edges(m, clean, corrupt, torch.stack([torch.zeros(len(g)), torch.ones(len(g))]), graph=g)
    n = clean.shape[0]
    assert torch.equal(out[:n], m.run(clean).output)
    torch.testing.assert_close(out[n:], m.run(corrupt).output, atol=1e-4, rtol=1e-4)


def test_single_edges_match_hand_path_computations(m):
    clean, corrupt = _pair()
    g = edge_graph(m)
    keys = ["embed", "resid_pre.1", "head_out.0", "head_in.1", "logits_in"]
    c, x = m.capture(clean, keys), m.capture(corrupt, keys)
    # embed -> query of head 2 in layer 1: only that slot reads clean resid_pre.1 + (corrupt - clean) embedding.
    full = c["head_in.1"].clone()
    full[:, :, 0, 2] += x["embed"] - c["embed"]
    want = m.run(clean, {"head_in.1[qkv=0,head=2]": Patch(cp.Cache({"head_in.1": full}, {"head_in.1": ()}))}).output
    got = patch_edges(m, clean, corrupt, g.mask(["embed->head_in.1[qkv=0,head=2]"]), graph=g)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # head_out.0[head=1] -> logits_in: the unembedding reads the corrupt head output, nothing else does.
    li = c["logits_in"] + x["head_out.0[head=1]"][:, :, 0] - c["head_out.0[head=1]"][:, :, 0]
    want = m.run(clean, {"logits_in": Patch(cp.Cache({"logits_in": li}, {"logits_in": ()}))}).output
    got = patch_edges(m, clean, corrupt, g.mask(["head_out.0[head=1]->logits_in"]), graph=g)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_zero_and_mean_ablation_of_every_edge_into_logits(m):
    clean, _ = _pair()
    g = edge_graph(m)
    into_logits = [name for name in g.edge_names if name.endswith("->logits_in")]
    out = patch_edges(m, clean, None, g.mask(into_logits), ablation="zero", graph=g)
    bias = m.module.transformer.h  # with every sender zeroed the unembedding reads only the attention biases
    resid = sum(b.attn.c_proj.bias for b in bias)
    ln_f, head = m.module.transformer.ln_f, m.module.lm_head
    want = head(ln_f(resid)).expand_as(out)
    torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4)
    out = patch_edges(m, clean, None, g.mask(into_logits), ablation="mean", graph=g)
    mean_in = m.capture(clean, "logits_in")["logits_in"].mean(0, keepdim=True)
    torch.testing.assert_close(out, head(ln_f(mean_in)).expand_as(out), atol=1e-4, rtol=1e-4)


def _sparse_model():
    """Two layers, double precision; only heads 0.1 and 1.2 write anything (other heads and MLPs output 0)."""
    model = randomize(tiny_gpt2()).double()
    with torch.no_grad():
        for layer, live in ((0, 1), (1, 2)):
            block = model.transformer.h[layer]
            w = block.attn.c_proj.weight  # Conv1D [heads * d_head, d_model]
            keep = w[live * 16 : (live + 1) * 16].clone()
            w.zero_()
            w[live * 16 : (live + 1) * 16] = keep
            block.mlp.c_proj.weight.zero_()
    return with_inputs(model)


def _truth(g):
    live = {"embed", "head_out.0[head=1]", "head_out.1[head=2]"}
    receivers = {"logits_in"} | {f"head_in.0[qkv={q},head=1]" for q in range(3)} | {f"head_in.1[qkv={q},head=2]" for q in range(3)}
    return {f"{s}->{r}" for s in live for r in receivers if f"{s}->{r}" in g.edge_names}


def test_eap_and_acdc_recover_the_known_edges():
    m = _sparse_model()
    clean, corrupt = _pair()
    g = edge_graph(m)
    truth = _truth(g)
    metric = cp.metrics.logit_diff(clean[:, -1], (clean[:, -1] + 1) % 100)
    scores = eap(m, clean, corrupt, metric, graph=g)
    by_name = dict(zip(g.edge_names, scores.values))
    assert all(v == 0 for k, v in by_name.items() if k not in truth)  # dead senders and receivers: exactly 0
    assert all(abs(by_name[k]) > 1e-12 for k in truth)
    for variant in ("inputs", "activations"):
        ig = eap_ig(m, clean, corrupt, metric, steps=3, variant=variant, graph=g)
        ig_by = dict(zip(g.edge_names, ig.values))
        assert all(v == 0 for k, v in ig_by.items() if k not in truth)
    circuit = acdc(m, clean, corrupt, metric, threshold=1e-14, graph=g)
    assert set(circuit.metadata["kept"]) == truth  # every true edge moves the logit difference (some by ~1e-10)
    circuit = acdc(m, clean, corrupt, threshold=1e-12, graph=g)  # KL: the weakest true edges fall below
    assert {"embed->logits_in", "head_out.1[head=2]->logits_in"} <= set(circuit.metadata["kept"]) <= truth


def test_eap_ig_with_one_step_is_eap_and_is_exact_on_logits_edges(m):
    clean, corrupt = _pair()
    g = edge_graph(m)
    metric = cp.metrics.logit_diff(clean[:, -1], (clean[:, -1] + 1) % 100)
    a = eap(m, clean, corrupt, metric, graph=g)
    b = eap_ig(m, clean, corrupt, metric, steps=1, graph=g)
    np.testing.assert_allclose(a.values, b.values, atol=1e-5)
    assert a.metadata["forwards"] == 2 and a.metadata["backwards"] == 1


def test_acdc_with_a_huge_threshold_removes_everything_and_batches(m):
    clean, corrupt = _pair()
    g = edge_graph(m)
    metric = cp.metrics.logit_diff(clean[:, -1], (clean[:, -1] + 1) % 100)
    res = acdc(m, clean, corrupt, metric, threshold=1e9, graph=g, batch_size=10_000, search="rounds")
    assert res.values.sum() == 0
    # two forwards per receiver (singles, running removals; one where the two are the same mask, a receiver
    # with one incoming edge: masks met before are not run again) + corrupt capture, clean run, baseline
    single = sum(1 for r in range(len(g.receivers)) if sum(rr == r for _, rr in g.edges) == 1)
    assert single > 0 and res.metadata["forwards"] == 2 * len(g.receivers) - single + 3
    # speculative: every guess (remove, as the last decision) holds, so one forward takes every candidate
    fast = acdc(m, clean, corrupt, metric, threshold=1e9, graph=g, batch_size=len(g) * clean.shape[0])
    assert fast.values.sum() == 0 and fast.metadata["forwards"] == 1 + 3


def test_batched_acdc_equals_the_sequential_greedy_algorithm(m):
    clean, corrupt = _pair()
    g = edge_graph(m)
    metric = cp.metrics.logit_diff(clean[:, -1], (clean[:, -1] + 1) % 100)
    fast = acdc(m, clean, corrupt, metric, threshold=3e-4, graph=g)

    def value(mask):
        return float(metric(patch_edges(m, clean, corrupt, mask, graph=g)).double().mean())

    removed = torch.zeros(len(g))
    current = value(removed)
    for r in reversed(range(len(g.receivers))):
        for e in sorted((e for e, (s, rr) in enumerate(g.edges) if rr == r), key=lambda e: -g.edges[e][0]):
            trial = removed.clone()
            trial[e] = 1
            v = value(trial)
            if abs(v - current) < 3e-4:
                removed, current = trial, v
    assert 0 < fast.values.sum() < len(g)
    np.testing.assert_array_equal(fast.values, connected(g, 1 - removed.numpy()))
    raw = acdc(m, clean, corrupt, metric, threshold=3e-4, graph=g, prune=False)
    np.testing.assert_array_equal(raw.values, 1 - removed.numpy())
    rounds = acdc(m, clean, corrupt, metric, threshold=3e-4, graph=g, prune=False, search="rounds")
    np.testing.assert_array_equal(rounds.values, 1 - removed.numpy())
    assert raw.metadata["forwards"] < rounds.metadata["forwards"]


def test_a_threshold_sweep_equals_acdc_at_each_threshold(m):
    """Each threshold of a sweep (guessing from the one before, sharing evaluated masks) gives what acdc
    alone gives; the sweep runs fewer forwards than the separate calls."""
    clean, corrupt = _pair()
    g = edge_graph(m)
    metric = cp.metrics.logit_diff(clean[:, -1], (clean[:, -1] + 1) % 100)
    thresholds = [1e-3, 1e-4, 3e-4]
    sweep = acdc_sweep(m, clean, corrupt, metric, thresholds=thresholds, graph=g)
    alone = [acdc(m, clean, corrupt, metric, threshold=t, graph=g, search="rounds") for t in thresholds]
    assert [r.metadata["threshold"] for r in sweep] == thresholds
    for a, b in zip(sweep, alone):
        np.testing.assert_array_equal(a.values, b.values)
        assert a.metadata["final_metric"] == pytest.approx(b.metadata["final_metric"], rel=1e-5)  # float32 runs
    assert len({r.values.sum() for r in sweep}) == 3  # three different circuits
    assert sweep[-1].metadata["forwards"] < sum(r.metadata["forwards"] for r in alone)


@pytest.mark.parametrize("ablation", ["resample", "zero", "mean"])
def test_runs_resumed_from_the_clean_prefix_equal_full_runs(m, ablation):
    """Before the first block a mask patches, every value is the clean run's: starting there changes nothing."""
    clean, corrupt = _pair()
    p = EdgePatcher(m, clean, corrupt, ablation, None, None)
    kept = p.keep_clean(None)
    g = p.graph
    starts = []
    real = p._execute

    def recording(*args, **kwargs):
        starts.append(None if kwargs.get("resume") is None else kwargs["resume"].layer)
        return real(*args, **kwargs)

    p._execute = recording
    gen = torch.Generator().manual_seed(0)
    for first in ("head_in.1", "mlp_in.1", "logits_in", "mlp_in.0"):  # receivers are in topological order
        at = min(i for i, name in enumerate(g.receivers) if name.startswith(first))
        allowed = torch.tensor([r >= at for _, r in g.edges], dtype=torch.float32)
        masks = (torch.rand(3, len(g), generator=gen) < 0.5).float() * allowed
        torch.testing.assert_close(p.run(masks, clean=kept), p.run(masks), atol=1e-5, rtol=0)
    assert starts == [1, None, 1, None, 1, None, None, None]  # block 1 is the last; mlp_in.0 sits in block 0


def test_acdc_prunes_the_edges_of_a_head_no_input_reaches():
    """Head 0.1 reads nothing (zero value weights, a value bias) and the MLPs write only their output bias: their
    writes are constants, so ACDC under zero ablation removes their incoming edges but keeps outgoing ones
    (zeroing a constant moves the output). Those lie on no input-to-output path: pruning removes exactly them."""
    m = _sparse_model()
    with torch.no_grad():
        m.module.transformer.h[0].attn.c_attn.weight[:, 128 + 16 : 128 + 32] = 0  # head 1's value columns
    clean, _ = _pair()
    g = edge_graph(m)
    metric = cp.metrics.logit_diff(clean[:, -1], (clean[:, -1] + 1) % 100)
    raw = acdc(m, clean, None, metric, threshold=1e-12, ablation="zero", graph=g, prune=False)
    constant = ("head_out.0[head=1]->", "mlp_out.0->", "mlp_out.1->")
    out_of_head = {e for e in raw.metadata["kept"] if e.startswith(constant)}
    assert any(e.startswith(constant[0]) for e in out_of_head)
    assert out_of_head and not any(e.endswith("head=1]") and e.startswith("embed->head_in.0") for e in raw.metadata["kept"])
    res = acdc(m, clean, None, metric, threshold=1e-12, ablation="zero", graph=g)
    assert set(res.metadata["pruned"]) == out_of_head
    assert set(res.metadata["kept"]) == set(raw.metadata["kept"]) - out_of_head
    np.testing.assert_array_equal(res.values, connected(g, raw.values))
    ablated = patch_edges(m, clean, None, torch.as_tensor(1 - res.values), ablation="zero", graph=g)
    assert res.metadata["final_metric"] == pytest.approx(float(metric(ablated).double().mean()), abs=1e-12)
