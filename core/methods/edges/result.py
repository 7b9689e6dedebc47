"""What the edge methods hand back: ``_flat_index`` places every edge in the per-receiver-key
``[n_in, *slots]`` score tensors concatenated flat (so scores come back in edge order with one
transfer), and ``_result`` wraps per-edge values in a :class:`~crosspatch.results.result.Result` over
the ``edge`` dim with the patcher's method metadata (ablation, prompts, forwards, shared positions,
model, versions).
"""

from __future__ import annotations

import numpy as np

from ...results.metrics import Metric
from ...results.result import Result, collect_versions
from .graph import EdgeGraph
from .patching import EdgePatcher


def _flat_index(g: EdgeGraph) -> np.ndarray:
    """Per edge, its position in the concatenated per-receiver-key ``[n_in, *slots]`` tensors."""
    if getattr(g, "_flat", None) is None:
        offsets = np.cumsum([0] + [n_in * int(np.prod(slots, dtype=int)) for _, n_in, slots in g.receiver_keys])
        index = np.empty(len(g.edges), dtype=np.int64)
        for e, (s, r) in enumerate(g.edges):
            k, slot = g.receiver_of[r]
            _, n_in, slots = g.receiver_keys[k]
            index[e] = offsets[k] + np.ravel_multi_index((s, *slot), (n_in, *slots))
        g._flat = index
    return g._flat


def _result(p: EdgePatcher, scores, method: str, metric: Metric, extra: dict) -> Result:
    metadata = {
        "method": method,
        "metric": metric.name,
        "ablation": p.ablation,
        "convention": "noising: clean base, patched edges carry the ablated sender value",
        "n_prompts": p.n,
        "n_edges": len(p.graph),
        "forwards": p.forwards,
        "shared_positions": p.shared_positions,
        "seed": None,
        **extra,
        "model": p.m.describe(),
        "adapter": p.m.adapter.name,
        "versions": collect_versions(),
    }
    return Result(np.asarray(scores, dtype=float), ("edge",), {"edge": p.graph.edge_names}, metadata)
