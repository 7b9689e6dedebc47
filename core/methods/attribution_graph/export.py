"""Attribution graphs as the JSON Neuronpedia's graph viewer reads (circuit-tracer's ``create_graph_files`` layout).

``{"metadata", "qParams", "nodes", "links"}``: nodes of the pruned graph (features, errors, token embeddings and
targets, each with its cumulative influence), links ``{source, target, weight}`` for the kept edges. Node ids
follow the reference so graphs open in its viewer unchanged:

=========  =====================  =====================  ==========================  =============
node       ``node_id``            ``jsNodeId``           ``feature``                 ``layer``
=========  =====================  =====================  ==========================  =============
feature    ``{layer}_{f}_{pos}``  ``{layer}_{f}-0``      Cantor pairing (layer, f)   ``"layer"``
error      ``{layer}_-1_{pos}``   ``{layer}_-1-{pos}``   -1                          ``"layer"``
token      ``E_{token}_{pos}``    ``E_{token}-{pos}``    pos                         ``"E"``
logit      ``{L+1}_{token}_{pos}``  ``L_{token}-{pos}``  token                       ``"L+1"``
=========  =====================  =====================  ==========================  =============

A target that is not one token's logit (a logit difference, a direction) is a ``logit`` node with
``feature`` null and id ``{L+1}_t{k}_{pos}``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from .graph import AttributionGraph
from .prune import Pruned, prune

__all__ = ["to_neuronpedia", "save_neuronpedia"]


def _cantor(x: int, y: int) -> int:
    return (x + y) * (x + y + 1) // 2 + y


def _token_text(graph: AttributionGraph, pos: int) -> str:
    return graph.token_labels[pos] if graph.token_labels else str(graph.tokens[pos])


def _nodes(graph: AttributionGraph, pruned: Pruned, decode) -> dict[int, dict]:
    n_layers = len(graph.layers)
    out: dict[int, dict] = {}
    kept = pruned.node_mask.nonzero()[:, 0].tolist()
    for node in kept:
        influence = float(pruned.cumulative[node])
        kind = graph.kind(node)
        if kind == "feature":
            layer, pos, f = (int(v) for v in graph.features[node])
            out[node] = {"node_id": f"{layer}_{f}_{pos}", "feature": _cantor(layer, f), "layer": str(layer),
                         "ctx_idx": pos, "feature_type": "cross layer transcoder", "jsNodeId": f"{layer}_{f}-0",
                         "clerp": "", "influence": influence, "activation": float(graph.activations[node])}
        elif kind == "error":
            k = node - graph.n_features
            layer, pos = graph.layers[k // graph.n_pos], k % graph.n_pos
            out[node] = {"node_id": f"{layer}_-1_{pos}", "feature": -1, "layer": str(layer), "ctx_idx": pos,
                         "feature_type": "mlp reconstruction error", "jsNodeId": f"{layer}_-1-{pos}", "clerp": "",
                         "influence": influence}
        elif kind == "token":
            pos = node - graph.n_features - graph.n_errors
            tok = graph.tokens[pos]
            out[node] = {"node_id": f"E_{tok}_{pos}", "feature": pos, "layer": "E", "ctx_idx": pos,
                         "feature_type": "embedding", "jsNodeId": f"E_{tok}-{pos}", "clerp": "", "influence": influence}
        else:
            k = node - graph.n_features - graph.n_errors - graph.n_pos
            t = graph.targets[k]
            layer = str(n_layers + 1)
            prob = float(t.probability if t.probability is not None else t.weight)
            if t.token is not None:
                text = decode(t.token)
                out[node] = {"node_id": f"{layer}_{t.token}_{t.pos}", "feature": int(t.token), "layer": layer,
                             "ctx_idx": t.pos, "feature_type": "logit", "jsNodeId": f"L_{t.token}-{t.pos}",
                             "clerp": f'Output "{text}" (p={prob:.3f})', "token_prob": prob,
                             "is_target_logit": k == 0, "influence": influence}
            else:
                out[node] = {"node_id": f"{layer}_t{k}_{t.pos}", "feature": None, "layer": layer, "ctx_idx": t.pos,
                             "feature_type": "logit", "jsNodeId": f"L_t{k}-{t.pos}", "clerp": t.name,
                             "token_prob": prob, "is_target_logit": k == 0, "influence": influence}
    return out


def to_neuronpedia(
    graph: AttributionGraph,
    pruned: "Pruned | None" = None,
    *,
    slug: str = "crosspatch-graph",
    scan: str | None = None,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
    tokenizer: Any = None,
) -> dict[str, Any]:
    """The graph as Neuronpedia's JSON (pruned with the thresholds unless ``pruned`` is given)."""
    from ... import __version__

    pruned = pruned if pruned is not None else prune(graph, node_threshold, edge_threshold)

    def decode(token: int) -> str:
        if tokenizer is not None:
            return tokenizer.decode([token])
        return str(token)

    nodes = _nodes(graph, pruned, decode)
    index = pruned.edges.indices()
    values = pruned.edges.values()
    links = [{"source": nodes[s]["node_id"], "target": nodes[t]["node_id"], "weight": float(w)}
             for t, s, w in zip(index[0].tolist(), index[1].tolist(), values.tolist()) if s in nodes and t in nodes]
    connected = {ln["source"] for ln in links} | {ln["target"] for ln in links}
    used = [n for n in nodes.values() if n["node_id"] in connected or n["feature_type"] in ("embedding", "logit")]
    meta = graph.metadata
    tokens = [_token_text(graph, p) for p in range(graph.n_pos)]
    settings = ("max_n_logits", "desired_logit_prob", "batch_size", "max_feature_nodes")
    return {
        "metadata": {
            "slug": slug,
            "scan": scan or str(meta.get("model", "model")),
            "transcoder_list": [],
            "prompt_tokens": tokens,
            "prompt": graph.prompt if graph.prompt is not None else " ".join(tokens),
            "node_threshold": pruned.node_threshold,
            "schema_version": 1,
            "info": {"generator": {"name": "crosspatch", "version": str(__version__)},
                     "create_time_ms": time.time() * 1000},
            "generation_settings": {k: meta[k] for k in settings if meta.get(k) is not None},
            "pruning_settings": {"node_threshold": pruned.node_threshold, "edge_threshold": pruned.edge_threshold},
        },
        "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""},
        "nodes": used,
        "links": links,
    }


def save_neuronpedia(graph: AttributionGraph, path: "str | Path", **kwargs: Any) -> Path:
    """Write :func:`to_neuronpedia` to ``path`` (a ``.json`` file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_neuronpedia(graph, **kwargs)), encoding="utf-8")
    return path
