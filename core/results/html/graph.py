"""The generic graph JSON the explorer draws, built from an edge Result.

    {"nodes": [{"id", "layer", "pos", "kind", "label"}, ...],
     "links": [{"source", "target", "weight"}, ...],
     "metadata": {...}}

close to Neuronpedia's attribution-graph schema (nodes carry a layer and a context position, links a
signed weight), so an attribution graph written in it is drawn the same way. An edge Result has the
one dim ``edge`` labelled ``"sender->receiver"`` (``crosspatch.methods.edges``); a node's ``layer`` is
its block (-1 for the embeddings, one past the last block for the logits' input), its ``kind`` the
site family without a tower prefix, its ``pos`` the position it is restricted to, if any.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Mapping

from ...sites.site import Site, SiteError, split_tower

if TYPE_CHECKING:
    from ..result import Result

__all__ = ["graph_json", "is_edge_result", "is_graph", "is_result", "normalize_graph"]

EDGE_SEPARATOR = "->"
#: Within a block, the order in which a residual model computes: a node's column follows it.
_ROLE_ORDER = {"embed": 0, "head_in": 1, "head_out": 2, "mlp_in": 3, "mlp_out": 4, "logits_in": 5}
_QKV = "qkv"


def is_result(value: Any) -> bool:
    """True for a crosspatch Result (told by its fields: this package is imported by the Result's module)."""
    return all(hasattr(value, name) for name in ("values", "dims", "coords", "metadata", "skipped"))


def is_edge_result(result: "Result") -> bool:
    """True for a Result over the one dim ``edge`` whose labels are ``"sender->receiver"``."""
    return is_result(result) and result.dims == ("edge",) and all(
        isinstance(label, str) and EDGE_SEPARATOR in label for label in result.coords["edge"]
    )


def is_graph(value: Any) -> bool:
    """True for a mapping in the graph schema (``nodes`` and ``links`` lists)."""
    return isinstance(value, Mapping) and isinstance(value.get("nodes"), list) and isinstance(value.get("links"), list)


def graph_json(result: "Result") -> dict[str, Any]:
    """The graph of an edge Result: every node once (in first-seen order), every edge a link."""
    if not is_edge_result(result):
        raise ValueError(
            f"graph_json needs a Result over the dim 'edge' labelled 'sender->receiver' (from crosspatch.methods."
            f"edges: eap, eap_ig, acdc), got dims {result.dims}"
        )
    names = [label.split(EDGE_SEPARATOR, 1) for label in result.coords["edge"]]
    order: dict[str, None] = {}
    for sender, receiver in names:
        order.setdefault(sender, None)
        order.setdefault(receiver, None)
    parsed = {name: _parse(name) for name in order}
    blocks = [site.layer for site in parsed.values() if site is not None and isinstance(site.layer, int)]
    last = (max(blocks) + 1) if blocks else 0
    nodes = [_node(name, parsed[name], last) for name in order]
    first_seen = {name: i for i, name in enumerate(order)}
    nodes.sort(key=lambda n: (n["layer"], _ROLE_ORDER.get(n["kind"], len(_ROLE_ORDER)), first_seen[n["id"]]))
    links = []
    for (sender, receiver), weight in zip(names, result.values.tolist()):
        links.append({"source": sender, "target": receiver, "weight": None if math.isnan(weight) else weight})
    meta = {k: v for k, v in result.metadata.items() if k in ("method", "metric", "ablation", "n_prompts", "model")}
    return {"nodes": nodes, "links": links, "metadata": meta}


def normalize_graph(graph: Mapping[str, Any]) -> dict[str, Any]:
    """A graph in this schema, or in Neuronpedia's (``node_id``, ``layer`` as a string with ``"E"`` for the
    embeddings, ``ctx_idx``, ``feature_type``, ``clerp``), as this schema, nodes ordered by layer, kind and
    position. Links keep their ``source``, ``target`` and ``weight``."""
    nodes = [dict(n) for n in graph["nodes"]]
    if nodes and all("id" not in n and "node_id" in n for n in nodes):
        numeric = [int(n["layer"]) for n in nodes if str(n.get("layer", "")).lstrip("-").isdigit()]
        top = max(numeric, default=0)
        for n in nodes:
            layer = str(n.get("layer", ""))
            n["id"] = n["node_id"]
            n["layer"] = int(layer) if layer.lstrip("-").isdigit() else (-1 if layer == "E" else top + 1)
            n["pos"] = n.get("ctx_idx")
            n["kind"] = str(n.get("feature_type", "node")).replace(" ", "_")
            n["label"] = n.get("clerp") or n["node_id"]
    kinds: dict[str, int] = {}
    for n in nodes:
        kinds.setdefault(n.get("kind", "node"), len(kinds))
    order = {id(n): i for i, n in enumerate(nodes)}
    nodes.sort(key=lambda n: (n.get("layer", 0), _ROLE_ORDER.get(n.get("kind"), len(_ROLE_ORDER) + kinds[n.get("kind",
               "node")]), n.get("pos") if isinstance(n.get("pos"), int) else -1, order[id(n)]))
    links = [{"source": l["source"], "target": l["target"], "weight": l.get("weight")} for l in graph["links"]]
    return {**{k: v for k, v in graph.items() if k not in ("nodes", "links")}, "nodes": nodes, "links": links}


def _parse(name: str) -> Site | None:
    try:
        return Site.parse(name)
    except SiteError:
        return None


def _node(name: str, site: Site | None, last: int) -> dict[str, Any]:
    if site is None:
        return {"id": name, "layer": 0, "pos": None, "kind": "node", "label": name}
    kind = split_tower(site.family)[1]
    if isinstance(site.layer, int):
        layer = site.layer
    else:
        layer = -1 if kind == "embed" else last
    selection = dict(site.sel)
    pos = selection.get("pos")
    label = " ".join([kind] + [_short(axis, value) for axis, value in site.sel])
    node = {"id": name, "layer": layer, "pos": pos if isinstance(pos, int) else None, "kind": kind, "label": label}
    if "head" in selection:
        node["head"] = selection["head"]
    return node


def _short(axis: str, value: Any) -> str:
    """A selection as a short node label: ``q``/``k``/``v`` for a head input, ``h2`` for a head."""
    if axis == "qkv" and value in (0, 1, 2):
        return _QKV[value]
    if axis == "head":
        return f"h{value}"
    return f"{axis}={value}"
