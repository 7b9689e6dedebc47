"""A Result (or a graph in the generic schema) as a JSON view: what the page draws and its numbers.

Kinds, chosen from the dims and the method:

* ``attention``  dims ending in ``pos``, ``key_pos`` (query x key), leading dims (``layer``, ``head``)
                 pick one pattern; tokens label both axes;
* ``graph``      an edge Result or a ``{nodes, links}`` mapping (:mod:`.graph`): laid out by layer;
* ``table``      a faithfulness table (dims ``ablation``): normalised score, circuit and ablated metric, KL;
* ``heatmap``    2-D, or more with a ``prompt`` dim (the mean is drawn, a click shows every prompt) or
                 leading dims picked with a selector;
* ``bars``       1-D; ``scalar`` 0-D.

Numbers are plain floats with NaN as ``null``; labels are strings.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from .graph import graph_json, is_edge_result, is_graph, is_result, normalize_graph
from .jsonable import jsonable as _jsonable

if TYPE_CHECKING:
    from ..result import Result

__all__ = ["view", "PROMPT_DIMS"]

#: Dims that count prompts: a heatmap draws their mean and shows each prompt on a click.
PROMPT_DIMS = ("prompt", "example")
_FACTS = ("method", "metric", "sites", "direction", "ablation", "n_prompts", "normalize", "baseline")


def view(item: "Result | Mapping[str, Any]", name: str = "") -> dict[str, Any]:
    """The JSON view of a Result or a graph mapping; ``name`` titles it."""
    if is_graph(item):
        graph = normalize_graph(item)
        return {"kind": "graph", "name": name, "graph": _jsonable(graph), "facts": _facts(graph.get("metadata", {}))}
    if not is_result(item):
        raise TypeError(f"{name or 'item'} is a {type(item).__name__}; the explorer draws a crosspatch Result or a "
                        f"graph mapping with 'nodes' and 'links'")
    base = {"name": name, "facts": _facts(item.metadata), "metadata": _jsonable(item.metadata),
            "dims": list(item.dims), "shape": list(item.values.shape)}
    dims = item.dims
    if is_edge_result(item):
        return {**base, "kind": "graph", "graph": graph_json(item)}
    if len(dims) >= 2 and dims[-2:] == ("pos", "key_pos"):
        return {**base, **_attention(item)}
    if item.metadata.get("method") == "faithfulness_table" and dims == ("ablation",):
        return {**base, **_table(item)}
    if item.values.ndim == 0:
        return {**base, "kind": "scalar", "value": _num(float(item.values))}
    if item.values.ndim == 1:
        return {**base, "kind": "bars", "x": _strs(item.coords[dims[0]]), "xdim": dims[0],
                "values": _nums(item.values), "skipped": _skipped(item), "site": _site_pattern(item)}
    return {**base, **_heatmap(item)}


def _heatmap(item: Result) -> dict[str, Any]:
    dims = list(item.dims)
    prompt = next((d for d in dims if d in PROMPT_DIMS), None)
    values = item.values
    skipped = item.skipped
    out: dict[str, Any] = {"kind": "heatmap"}
    if prompt is not None:
        axis = dims.index(prompt)
        out["prompts"] = _strs(item.coords[prompt])
        per_prompt = np.moveaxis(values, axis, -1)  # [..., prompt]
        dims.pop(axis)
        values = values.mean(axis=axis)
        skipped = None if skipped is None else skipped.all(axis=axis)
        out["per_prompt"] = _nums(per_prompt)
    # Leading dims beyond the last two are picked with a selector: values [*lead, rows, cols].
    out.update(
        rows=_strs(item.coords[dims[-2]]), cols=_strs(item.coords[dims[-1]]), rowdim=dims[-2], coldim=dims[-1],
        lead=[{"dim": d, "labels": _strs(item.coords[d])} for d in dims[:-2]],
        values=_nums(values), skipped=None if skipped is None or not skipped.any() else skipped.tolist(),
        site=_site_pattern(item),
    )
    return out


def _attention(item: Result) -> dict[str, Any]:
    dims = item.dims
    lead = [{"dim": d, "labels": _strs(item.coords[d])} for d in dims[:-2]]
    return {"kind": "attention", "queries": _strs(item.coords["pos"]), "keys": _strs(item.coords["key_pos"]),
            "lead": lead, "values": _nums(item.values)}


def _table(item: Result) -> dict[str, Any]:
    meta = item.metadata
    columns = ["faithfulness"]
    extra = [key for key in ("circuit", "ablated", "kl") if isinstance(meta.get(key), Mapping)]
    rows = []
    for label, value in zip(item.coords["ablation"], item.values.tolist()):
        row = [_num(value)] + [_num(_float(meta[key].get(label))) for key in extra]
        rows.append({"label": str(label), "cells": row})
    names = {"circuit": "metric, circuit", "ablated": "metric, all ablated", "kl": "KL(full ‖ circuit)"}
    full = _float(meta.get("full"))
    return {"kind": "table", "rowdim": "ablation", "columns": columns + [names[k] for k in extra], "rows": rows,
            "note": None if full is None else f"metric of the full model: {full:.4g}"}


def _site_pattern(item: Result) -> str | None:
    sites = item.metadata.get("sites")
    return sites if isinstance(sites, str) else None


def _facts(meta: Mapping[str, Any]) -> list[str]:
    facts = []
    for key in _FACTS:
        value = meta.get(key)
        if value is None or value is False:
            continue
        if key == "baseline" and isinstance(value, Mapping):
            facts.append(", ".join(f"{k} {_fmt(v)}" for k, v in value.items()))
        elif key == "baseline":
            facts.append(f"baseline {_fmt(value)}")
        elif key == "n_prompts":
            facts.append(f"{value} prompts")
        elif key == "normalize":
            facts.append("normalised by the clean-corrupt gap")
        else:
            facts.append(", ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value))
    return facts


def _float(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _fmt(value: Any) -> str:
    number = _float(value)
    return str(value) if number is None else f"{number:.4g}"


def _num(value: float | None) -> float | None:
    return None if value is None or math.isnan(value) else (value if math.isfinite(value) else math.copysign(1e308, value))


def _nums(values: np.ndarray) -> Any:
    """Nested lists of floats, NaN as None, infinities clipped to the largest float (JSON has none)."""
    array = np.asarray(values, dtype=float)
    clipped = np.clip(array, -1e308, 1e308)
    out = clipped.astype(object)
    out[np.isnan(array)] = None
    return out.tolist()


def _strs(labels: list) -> list[str]:
    return [str(label) for label in labels]


def _skipped(item: Result) -> list[bool] | None:
    if item.skipped is None or not item.skipped.any():
        return None
    return item.skipped.tolist()
