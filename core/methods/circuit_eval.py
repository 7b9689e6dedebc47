"""Circuit recovery against a ground truth: TPR / FPR over a threshold sweep, ROC curve and AUC.

Scores are per edge (``"sender->receiver"``) or per node; the larger ``|score|`` (or the score,
with ``absolute=False``) the more an element is predicted to be in the circuit. An element is
predicted at threshold ``t`` when its score is ``>= t``. Node scores can be derived from edge
scores with :func:`node_scores` (the largest score of an edge touching the node).
"""

from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np

from ..results.result import Result

__all__ = ["roc", "node_scores", "edge_nodes", "plot_roc"]


def _as_mapping(scores: "Result | Mapping[str, float]") -> dict[str, float]:
    if isinstance(scores, Result):
        if scores.values.ndim != 1:
            raise ValueError(f"roc needs one score per element (a 1-d Result), got dims {scores.dims}")
        return {str(k): float(v) for k, v in zip(scores.coords[scores.dims[0]], scores.values)}
    return {str(k): float(v) for k, v in scores.items()}


def edge_nodes(edges: Iterable[str]) -> set[str]:
    """The nodes an edge set touches (both ends of every ``"sender->receiver"``)."""
    return {node for edge in edges for node in edge.split("->")}


def node_scores(edge_scores: "Result | Mapping[str, float]", absolute: bool = True) -> dict[str, float]:
    """Per node, the largest (absolute) score of the edges touching it."""
    out: dict[str, float] = {}
    for edge, value in _as_mapping(edge_scores).items():
        v = abs(value) if absolute else value
        for node in edge.split("->"):
            out[node] = max(out.get(node, -np.inf), v)
    return out


def roc(
    scores: "Result | Mapping[str, float]",
    truth: Iterable[str],
    *,
    thresholds: "Iterable[float] | None" = None,
    absolute: bool = True,
    level: str = "edge",
) -> Result:
    """TPR and FPR at every threshold, as a Result with dims ``("threshold", "rate")`` (rate: tpr, fpr).

    Without ``thresholds`` the sweep is every distinct score, from above the largest (nothing
    predicted: (0, 0)) down to the smallest (everything predicted: (1, 1)). ``metadata["auc"]`` is the
    trapezoidal area under the (fpr, tpr) curve of the sweep.
    """
    table = _as_mapping(scores)
    truth = set(truth)
    unknown = truth - set(table)
    if unknown:
        raise ValueError(f"ground-truth {level}s not among the scored ones: {sorted(unknown)[:5]}")
    names = list(table)
    s = np.array([table[n] for n in names])
    s = np.abs(s) if absolute else s
    positive = np.array([n in truth for n in names])
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"a ROC needs both positive and negative {level}s; got {n_pos} and {n_neg}")
    if thresholds is None:
        distinct = np.unique(s)[::-1]
        ts = np.concatenate([[np.inf], distinct])
    else:
        ts = np.sort(np.asarray(list(thresholds), dtype=float))[::-1]
    predicted = s[None, :] >= ts[:, None]
    tpr = (predicted & positive).sum(axis=1) / n_pos
    fpr = (predicted & ~positive).sum(axis=1) / n_neg
    order = np.lexsort((tpr, fpr))
    auc = float(np.trapezoid(tpr[order], fpr[order]) if hasattr(np, "trapezoid") else np.trapz(tpr[order], fpr[order]))
    values = np.stack([tpr, fpr], axis=1)
    metadata = {"method": "roc", "level": level, "auc": auc, "n_positive": n_pos, "n_negative": n_neg, "absolute": absolute}
    return Result(values, ("threshold", "rate"), {"threshold": [float(t) for t in ts], "rate": ["tpr", "fpr"]}, metadata)


def plot_roc(result: Result, ax=None, label: str | None = None):
    """The ROC curve of a :func:`roc` Result on a matplotlib Axes (created when not given)."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(4, 4))
    tpr, fpr = result.values[:, 0], result.values[:, 1]
    order = np.lexsort((tpr, fpr))
    auc = result.metadata.get("auc", float("nan"))
    ax.plot(fpr[order], tpr[order], marker=".", label=f"{label or result.metadata.get('level', '')} AUC={auc:.3f}")
    ax.plot([0, 1], [0, 1], color="0.7", linestyle="--", linewidth=1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.legend(loc="lower right")
    return ax
