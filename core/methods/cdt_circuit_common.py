"""What CD-T's circuit searches (:mod:`.cdt_circuit` over components, :mod:`.cdt_circuit_nodes` over positions)
record alike: the metadata of their Result."""

from __future__ import annotations

from typing import Any

from ..engine.model import WrappedModel
from ..results.metrics import Metric
from ..results.result import collect_versions

__all__ = ["search_metadata"]


def search_metadata(m: WrappedModel, metric: Metric | None, *, granularity: str, score: str, threshold: float,
                    irrel: str, paths: str, **found: Any) -> dict[str, Any]:
    """The metadata of a circuit search's Result: its settings, what it found (``found``: kept, nodes, senders,
    levels, scored, decompositions, n_prompts ...) and the model's description."""
    return {
        "method": "cdt_circuit",
        "granularity": granularity,
        "metric": None if metric is None else metric.name,
        "score": score,
        "threshold": threshold,
        "irrel": irrel,
        "paths": paths,
        **found,
        "seed": None,
        "model": m.describe(),
        "adapter": m.adapter.name,
        "versions": collect_versions(),
    }
