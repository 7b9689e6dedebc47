"""Neuronpedia graph JSON: valid against the published schema (kept in tests/data), and the pruned graph's own
nodes and edges; the transcoder zoo entries register."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import crosspatch as cp
from crosspatch.methods.attribution_graph import attribution_graph, logit_diff
from crosspatch.methods.attribution_graph.export import save_neuronpedia, to_neuronpedia
from crosspatch.methods.attribution_graph.prune import prune
from test_attribution_graph import random_transcoder

SCHEMA = Path(__file__).parent.parent / "data" / "neuronpedia_graph_schema.json"


@pytest.fixture(scope="module")
def model():
    from conftest import randomize, tiny_gpt2

    return cp.wrap(randomize(tiny_gpt2()).double())


_TYPES = {"object": dict, "array": list, "string": str, "integer": int, "number": (int, float), "null": type(None),
          "boolean": bool}


def _check(value, schema, path="$"):
    """The draft-07 keywords the schema uses (type, required, properties, items), so the check runs without
    jsonschema; it raises ValueError naming the path."""
    kinds = schema.get("type")
    if kinds is not None:
        kinds = [kinds] if isinstance(kinds, str) else kinds
        ok = any(isinstance(value, _TYPES[k]) and not (k in ("integer", "number") and isinstance(value, bool))
                 for k in kinds)
        if not ok:
            raise ValueError(f"{path}: {value!r} is not of type {kinds}")
    if isinstance(value, dict):
        for name in schema.get("required", []):
            if name not in value:
                raise ValueError(f"{path}: {name!r} is a required property")
        for name, sub in schema.get("properties", {}).items():
            if name in value:
                _check(value[name], sub, f"{path}.{name}")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            _check(item, schema["items"], f"{path}[{i}]")


def _validate(doc):
    schema = json.loads(SCHEMA.read_text())
    _check(doc, schema)
    try:
        import jsonschema
    except ImportError:
        return
    jsonschema.validate(doc, schema)


def test_export_is_valid_and_holds_the_pruned_graph(model, tmp_path):
    ids = torch.randint(1, 100, (1, 6), generator=torch.Generator().manual_seed(0))
    graph = attribution_graph(model, random_transcoder(64, 2, cross_layer=True, seed=11), ids, progress=False)
    pruned = prune(graph)
    path = save_neuronpedia(graph, tmp_path / "g.json", slug="tiny", scan="tiny-gpt2")
    doc = json.loads(path.read_text())
    _validate(doc)
    assert doc["metadata"]["slug"] == "tiny" and doc["metadata"]["scan"] == "tiny-gpt2"
    assert doc["metadata"]["pruning_settings"] == {"node_threshold": 0.8, "edge_threshold": 0.98}
    ids_ = [n["node_id"] for n in doc["nodes"]]
    assert len(ids_) == len(set(ids_))
    kinds = [n["feature_type"] for n in doc["nodes"]]
    assert kinds.count("embedding") == 6 and kinds.count("logit") == len(graph.targets)
    assert kinds.count("cross layer transcoder") > 0
    # every link is a kept edge with the adjacency's weight, between nodes that are in the file
    A = graph.dense()
    by_id = {}
    for k in pruned.node_mask.nonzero()[:, 0].tolist():
        kind = graph.kind(k)
        if kind == "feature":
            L, p, f = graph.features[k].tolist()
            by_id[f"{L}_{f}_{p}"] = k
        elif kind == "error":
            e = k - graph.n_features
            by_id[f"{graph.layers[e // 6]}_-1_{e % 6}"] = k
        elif kind == "token":
            p = k - graph.n_features - graph.n_errors
            by_id[f"E_{graph.tokens[p]}_{p}"] = k
        else:
            t = graph.targets[k - graph.n_features - graph.n_errors - 6]
            by_id[f"3_{t.token}_{t.pos}"] = k
    assert len(doc["links"]) == pruned.edges._nnz() > 0
    for link in doc["links"]:
        assert link["source"] in ids_ and link["target"] in ids_
        assert link["weight"] == pytest.approx(float(A[by_id[link["target"]], by_id[link["source"]]]), rel=1e-12)
    top = next(n for n in doc["nodes"] if n.get("is_target_logit"))
    assert top["token_prob"] == pytest.approx(graph.targets[0].probability)


def test_custom_targets_export_as_logit_nodes_without_a_feature(model):
    ids = torch.randint(1, 100, (1, 5), generator=torch.Generator().manual_seed(1))
    graph = attribution_graph(model, random_transcoder(64, 2, cross_layer=False, seed=12), ids,
                              targets=[logit_diff(4, 9, 100, dtype=torch.float64)], progress=False)
    doc = to_neuronpedia(graph, node_threshold=1.0, edge_threshold=1.0)
    _validate(doc)
    target = [n for n in doc["nodes"] if n["feature_type"] == "logit"]
    assert len(target) == 1 and target[0]["feature"] is None and target[0]["clerp"] == "logit 4 - logit 9"


def test_the_schema_rejects_what_the_viewer_cannot_read(model):
    ids = torch.randint(1, 100, (1, 5), generator=torch.Generator().manual_seed(2))
    doc = to_neuronpedia(attribution_graph(model, random_transcoder(64, 2, cross_layer=False), ids, progress=False))
    schema = json.loads(SCHEMA.read_text())
    bad = json.loads(json.dumps(doc))
    del bad["nodes"][0]["jsNodeId"]
    with pytest.raises(ValueError, match="jsNodeId"):
        _check(bad, schema)
    bad = json.loads(json.dumps(doc))
    bad["links"].append({"source": "a", "target": "b", "weight": "heavy"})
    with pytest.raises(ValueError, match="weight"):
        _check(bad, schema)
    try:
        import jsonschema
    except ImportError:
        return
    del doc["nodes"][0]["jsNodeId"]
    with pytest.raises(jsonschema.ValidationError, match="jsNodeId"):
        jsonschema.validate(doc, schema)


def test_the_transcoder_zoo_entries_register(tmp_path, monkeypatch):
    from crosspatch import zoo
    from crosspatch.methods.attribution_graph import zoo as entries
    from crosspatch.plugins.registry import get_registry, reset_registry

    monkeypatch.setenv("CROSSPATCH_CACHE", str(tmp_path))
    reset_registry()
    try:
        if "ioi-gpt2-tiny-transcoders" not in zoo.models():
            get_registry().register(entries, "attribution-graph-zoo")
        models = zoo.models()
        for name, task in (("ioi-gpt2-tiny-transcoders", "ioi"), ("greater-than-tiny-transcoders", "greater-than")):
            assert models[name].task == task and models[name].trains
            assert not zoo.cached(name)
    finally:
        reset_registry()
