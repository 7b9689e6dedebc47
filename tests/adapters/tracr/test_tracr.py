"""tracr-compiled RASP programs (converted once by tools/tracr_convert.py; no jax here): the torch model
reproduces tracr's outputs, the ground-truth circuit lives in the edge graph, and edge methods recover it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import crosspatch as cp
from crosspatch.adapters.tracr import TracrAdapter, load, output_distance, output_score
from crosspatch.methods.circuit_eval import roc
from crosspatch.methods.edge_paths import connected
from crosspatch.methods.edges import acdc, eap, eap_ig, edge_graph, patch_edges

DATA = Path(__file__).resolve().parents[2] / "data" / "tracr"
PROGRAMS = ["reverse", "frac_prevs", "sort_unique", "hist"]
# ACDC's clean batch: every reference input of one length. reverse uses length 3, since on length-5
# inputs its length sub-circuit outputs 5 whether or not it is zero-ablated (so it is invisible there).
ACDC_LENGTH = {"reverse": 3, "frac_prevs": 5, "sort_unique": 5, "hist": 5}


@pytest.fixture(scope="module", params=PROGRAMS)
def program(request):
    model = load(DATA, request.param)
    return request.param, model, cp.wrap(model)


def _by_length(model):
    groups: dict[int, list] = {}
    for ref in model.meta["reference"]:
        groups.setdefault(len(ref["ids"]), []).append(ref)
    return groups


def test_reproduces_the_compiled_tracr_model(program):
    name, model, m = program
    total = 0
    for refs in _by_length(model).values():
        ids = torch.tensor([r["ids"] for r in refs])
        out = m.run(ids).output
        want = torch.tensor([r["output"] for r in refs])
        if model.categorical:
            assert torch.equal(out.argmax(-1)[:, 1:], want[:, 1:])  # position 0 is BOS, not decoded by tracr
            decoded = model.decode(out)
            assert all(d[1:] == r["decoded"][1:] for d, r in zip(decoded, refs))
        else:
            torch.testing.assert_close(out[:, 1:, 0], want[:, 1:].float(), atol=1e-5, rtol=0)
        total += len(refs)
    assert total == len(model.meta["reference"]) >= 48


def test_ground_truth_is_in_the_edge_graph(program):
    name, model, m = program
    g = edge_graph(m)
    truth = set(model.circuit_edges)
    assert truth and truth <= set(g.edge_names)
    assert any(e.endswith("->logits_in") for e in truth)
    # every RASP dependency between expressions was matched to an edge by the converter
    assert model.meta["circuit"]["rasp_dependencies_checked"]


def _inert(m, model, g, inputs):
    """True edges whose zero ablation alone changes no decoded-position output by more than 1e-4 on ``inputs`` (tracr's structure-only edges:
    a TRUE selector's query/key, the attend-to-BOS default where a key always matches, a sub-circuit
    whose ablated value equals the clean one on these inputs)."""
    truth = model.circuit_edges
    masks = torch.stack([g.mask([e]) for e in truth])
    base = m.run(inputs).output
    out = patch_edges(m, inputs, None, masks, ablation="zero", graph=g).view(len(truth), *base.shape)
    moved = (out - base)[:, :, 1:].abs().flatten(1).amax(1) > 1e-4  # position 0 (BOS) is not decoded
    return {e for e, mv in zip(truth, moved.tolist()) if not mv}


def _pair(model, length, n=16, seed=0):
    refs = _by_length(model)[length + 1]
    ids = torch.tensor([r["ids"] for r in refs])
    gen = torch.Generator().manual_seed(seed)
    return ids[torch.randperm(len(ids), generator=gen)[:n]], ids[torch.randperm(len(ids), generator=gen)[:n]]


def test_acdc_zero_ablation_recovers_the_circuit(program, record_property):
    name, model, m = program
    g = edge_graph(m)
    truth = set(model.circuit_edges)
    clean, _ = _pair(model, ACDC_LENGTH[name])
    effective = truth - _inert(m, model, g, clean)
    res = acdc(m, clean, None, output_distance(model.categorical), threshold=1e-12, ablation="zero",
               change="increase", graph=g)
    kept = set(res.metadata["kept"])
    # The kept set is what pruning left: every kept edge lies on an input-to-output path of kept edges.
    assert (connected(g, res.values) == res.values).all()
    assert not set(res.metadata["pruned"]) & truth  # pruning never removes a ground-truth edge here
    # ACDC returns 1 (kept) / 0 (removed) per edge: the ROC of that binary score has one interior point
    assert kept == effective  # no false positives; every edge with an effect anywhere is kept
    auc = roc(res, truth).metadata["auc"]
    record_property(f"{name}_acdc_zero_auc", round(auc, 3))
    assert auc >= (0.88 if name == "reverse" else 0.95)  # reverse: 3 of 13 structural edges are inert here
    assert roc(res, effective).metadata["auc"] == 1.0


def test_edge_methods_under_resample_ablation_report_aucs(program, record_property):
    name, model, m = program
    g = edge_graph(m)
    truth = set(model.circuit_edges)
    clean, corrupt = _pair(model, ACDC_LENGTH[name])
    score = output_score(model.categorical)
    aucs = {
        "eap": roc(eap(m, clean, corrupt, score, graph=g), truth).metadata["auc"],
        "eap_ig": roc(eap_ig(m, clean, corrupt, score, steps=5, graph=g), truth).metadata["auc"],
        "acdc": roc(acdc(m, clean, corrupt, output_distance(model.categorical), threshold=1e-6, change="increase",
                         graph=g), truth).metadata["auc"],
        "eap_zero": roc(eap(m, clean, None, score, ablation="zero", graph=g), truth).metadata["auc"],
    }
    for k, v in aucs.items():
        record_property(f"{name}_{k}_auc", round(v, 3))
        assert 0.0 <= v <= 1.0
    assert aucs["eap"] >= 0.5  # not worse than chance; the measured values are in docs/tracr.md


def test_all_edges_patched_is_the_corrupt_run(program):
    name, model, m = program
    g = edge_graph(m)
    clean, corrupt = _pair(model, 5)
    out = patch_edges(m, clean, corrupt, torch.stack([torch.zeros(len(g)), torch.ones(len(g))]), graph=g)
    n = clean.shape[0]
    assert torch.equal(out[:n], m.run(clean).output)
    torch.testing.assert_close(out[n:], m.run(corrupt).output, atol=1e-4, rtol=1e-4)


def test_catalog_and_head_in_slots(program):
    name, model, m = program
    fams = [f.name for f in m.catalog]
    for f in ("embed", "resid_pre", "head_in", "head_out", "attn_out", "mlp_in", "mlp_out", "resid_post", "logits_in", "logits"):
        assert f in fams
    clean, corrupt = _pair(model, 5, n=4)
    c = m.capture(clean, ["resid_pre.0", "head_in.0", "head_out.0", "attn_out.0", "logits_in", "resid_post.*"])
    assert torch.equal(c["head_in.0"][:, :, 1, 0], c["resid_pre.0"])
    torch.testing.assert_close(c["head_out.0"].sum(2) + model.blocks[0].attn.b_o, c["attn_out.0"])
    assert torch.equal(c["logits_in"], c[f"resid_post.{model.n_layers - 1}"])


def test_the_registry_finds_the_tracr_adapter(program):
    """The adapter comes through the `tracr` entry point, exactly as a plugin's would."""
    _, model, m = program
    assert m.adapter.name == "tracr" and isinstance(m.adapter, TracrAdapter)
