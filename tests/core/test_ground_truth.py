"""The ground-truth residual model: patch_edges against the closed form, and circuit recovery by EAP / EAP-IG / ACDC."""

from __future__ import annotations

import pytest
import torch

from crosspatch.zoo.ground_truth import closed_form, closed_form_metric, residual_toy, true_edges, true_nodes
from crosspatch.methods.circuit_eval import edge_nodes, node_scores, roc
from crosspatch.methods.edges import acdc, eap, eap_ig, edge_graph, patch_edges


@pytest.fixture(scope="module")
def m():
    return residual_toy()


def _pair():
    gen = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 50, (4, 5), generator=gen)
    corrupt = (clean + torch.randint(1, 49, (4, 5), generator=gen)) % 50  # differs everywhere
    return clean, corrupt


def _logit_diff(out, ctx=None):
    return out[:, -1, 0] - out[:, -1, 1]


def test_graph_and_truth(m):
    g = edge_graph(m)
    assert true_edges() <= set(g.edge_names)
    assert true_nodes() == edge_nodes(true_edges())
    assert len(g.senders) == 1 + 2 * 3 and len(g.receivers) == 2 * (6 + 1) + 1


@pytest.mark.parametrize("ablation", ["resample", "zero", "mean"])
def test_patch_edges_matches_the_closed_form(m, ablation):
    clean, corrupt = _pair()
    g = edge_graph(m)
    gen = torch.Generator().manual_seed(1)
    masks = torch.bernoulli(torch.full((24, len(g)), 0.5), generator=gen)
    masks[0] = 0
    masks[1] = 1
    for j in range(2, 8):  # subsets of the true edges alone, so the circuit itself is exercised
        masks[j] = 0
        for name in true_edges():
            masks[j, g.index(name)] = float(torch.rand((), generator=gen) < 0.5)
    out = patch_edges(m, clean, corrupt, masks, ablation=ablation, graph=g)
    n = clean.shape[0]
    for j, mask in enumerate(masks):
        patched = [name for name, v in zip(g.edge_names, mask) if v]
        want = closed_form(clean, corrupt, patched, ablation=ablation)
        torch.testing.assert_close(out[j * n : (j + 1) * n], want, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(out[:n], m.run(clean).output)
    if ablation == "resample":
        torch.testing.assert_close(out[n : 2 * n], m.run(corrupt).output)


def test_only_true_edges_move_the_metric(m):
    clean, corrupt = _pair()
    g = edge_graph(m)
    base = closed_form_metric(clean, corrupt, [])
    for name in g.edge_names:
        moved = not torch.allclose(closed_form_metric(clean, corrupt, [name]), base)
        assert moved == (name in true_edges()), name


@pytest.mark.parametrize("ablation", ["resample", "zero"])
def test_eap_eap_ig_and_acdc_recover_the_circuit(m, ablation):
    clean, corrupt = _pair()
    g = edge_graph(m)
    truth = true_edges()
    aucs = {}
    aucs["eap"] = roc(eap(m, clean, corrupt, _logit_diff, ablation=ablation, graph=g), truth).metadata["auc"]
    ig = eap_ig(m, clean, corrupt, _logit_diff, steps=4, ablation=ablation, graph=g, variant="inputs")
    aucs["eap_ig"] = roc(ig, truth).metadata["auc"]
    circuit = acdc(m, clean, corrupt, _logit_diff, threshold=1e-9, ablation=ablation, graph=g)
    aucs["acdc"] = roc(circuit, truth).metadata["auc"]
    assert set(circuit.metadata["kept"]) == truth
    node_auc = roc(node_scores(eap(m, clean, corrupt, _logit_diff, ablation=ablation, graph=g)), true_nodes(), level="node")
    assert all(v >= 0.95 for v in aucs.values()), aucs
    assert node_auc.metadata["auc"] >= 0.95


def test_eap_is_exact_on_the_linear_edges(m):
    """Edges whose path to the logits is linear: EAP's first-order estimate is the exact effect."""
    clean, corrupt = _pair()
    g = edge_graph(m)
    scores = dict(zip(g.edge_names, eap(m, clean, corrupt, _logit_diff, graph=g).values))
    base = closed_form_metric(clean, corrupt, [])
    for name in ("embed->logits_in", "head_out.1[head=1]->logits_in", "mlp_out.0->logits_in",
                 "head_out.0[head=0]->head_in.1[qkv=2,head=1]", "embed->head_in.0[qkv=2,head=0]"):
        effect = float((closed_form_metric(clean, corrupt, [name]) - base).mean())
        assert scores[name] == pytest.approx(effect, rel=1e-9, abs=1e-12), name


def test_eap_ig_activations_variant_recovers_the_circuit(m):
    clean, corrupt = _pair()
    g = edge_graph(m)
    ig = eap_ig(m, clean, corrupt, _logit_diff, steps=4, graph=g, variant="activations")
    assert roc(ig, true_edges()).metadata["auc"] >= 0.95


def test_mean_ablation(m):
    """Mean ablation of a linear edge moves each prompt's metric by C * (mean - value): zero on average,
    so a prompt-averaged logit difference cannot see it; the per-prompt KL can."""
    clean, _ = _pair()
    g = edge_graph(m)
    circuit = acdc(m, clean, None, threshold=1e-12, ablation="mean", graph=g)
    assert set(circuit.metadata["kept"]) == true_edges()
    assert roc(eap(m, clean, None, _logit_diff, ablation="mean", graph=g), true_edges()).metadata["auc"] >= 0.9


@pytest.mark.parametrize("ablation", ["resample", "zero"])
def test_learned_edge_masks_recover_the_circuit(m, ablation):
    from crosspatch.methods.edge_masks import learn_edge_masks

    clean, corrupt = _pair()
    g = edge_graph(m)
    res = learn_edge_masks(m, clean, corrupt, ablation=ablation, graph=g, steps=100, sparsity=0.05)
    assert roc(res, true_edges()).metadata["auc"] >= 0.95
    assert set(res.metadata["kept"]) == true_edges()
