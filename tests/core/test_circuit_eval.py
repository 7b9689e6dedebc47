"""ROC / AUC of circuit recovery against hand-computed curves."""

from __future__ import annotations

import numpy as np
import pytest

from crosspatch.methods.circuit_eval import edge_nodes, node_scores, plot_roc, roc
from crosspatch.results.result import Result


def test_roc_matches_a_hand_computed_curve():
    # scores 0.9 (T), 0.8 (F), 0.7 (T), 0.1 (F), 0.05 (T): 3 positives, 2 negatives
    scores = {"a->b": 0.9, "a->c": -0.8, "b->c": 0.7, "c->d": 0.1, "a->d": 0.05}
    truth = {"a->b", "b->c", "a->d"}
    res = roc(scores, truth)
    assert res.dims == ("threshold", "rate") and res.coords["rate"] == ["tpr", "fpr"]
    tpr = [0, 1 / 3, 1 / 3, 2 / 3, 2 / 3, 1]
    fpr = [0, 0, 1 / 2, 1 / 2, 1, 1]
    np.testing.assert_allclose(res.values[:, 0], tpr)
    np.testing.assert_allclose(res.values[:, 1], fpr)
    # area: from fpr 0 to 1/2 at tpr 1/3 (the vertical steps add nothing), then 1/2 at 2/3 -> 1/6 + 1/3
    assert res.metadata["auc"] == pytest.approx(1 / 2)


def test_given_thresholds_perfect_and_signed_scores():
    res = roc({"x": 3.0, "y": 2.0, "z": 0.5}, {"x", "y"}, thresholds=[0.0, 1.0, 10.0])
    assert res.coords["threshold"] == [10.0, 1.0, 0.0]
    np.testing.assert_allclose(res.values, [[0, 0], [1, 0], [1, 1]])
    assert res.metadata["auc"] == pytest.approx(1.0)
    signed = roc({"x": -3.0, "y": 2.0, "z": 0.5}, {"x"}, absolute=False)
    assert signed.metadata["auc"] == pytest.approx(0.0)


def test_nodes_from_edges_and_a_result_input():
    edges = Result(np.array([0.5, -2.0, 0.1]), ("edge",), {"edge": ["e->h", "h->l", "e->m"]})
    assert node_scores(edges) == {"e": 0.5, "h": 2.0, "l": 2.0, "m": 0.1}
    assert edge_nodes(["e->h", "h->l"]) == {"e", "h", "l"}
    res = roc(node_scores(edges), edge_nodes(["h->l"]), level="node")
    assert res.metadata["auc"] == pytest.approx(1.0) and res.metadata["level"] == "node"
    with pytest.raises(ValueError, match="not among"):
        roc(edges, {"q->r"})


def test_plot():
    import matplotlib

    matplotlib.use("Agg")
    ax = plot_roc(roc({"x": 3.0, "y": 2.0, "z": 0.5}, {"x"}))
    assert len(ax.lines) == 2
