"""The interactive pages without a browser: which view a Result gets, the numbers it carries, the
graph JSON of an edge Result, escaping, and that the shipped assets are package data."""

from __future__ import annotations

import json
import re
import tomllib
from fnmatch import fnmatch
from pathlib import Path

import numpy as np
import pytest

from crosspatch import Result
from crosspatch.results.html import graph_json, page_html, view
from crosspatch.results.html.page import asset
from crosspatch.results.report import EXPLORER, write_report

ROOT = Path(__file__).resolve().parents[2]


def _data(page: str) -> dict:
    block = re.search(r'<script type="application/json" id="cp-data">(.*?)</script>', page, re.S).group(1)
    return json.loads(block)


def _edges() -> Result:
    names = ["embed->head_in.0[qkv=0,head=1]", "embed->mlp_in.0", "head_out.0[head=1]->mlp_in.0",
             "mlp_out.0->logits_in", "head_out.0[head=1]->logits_in", "embed->logits_in"]
    return Result(np.array([0.5, -0.25, 1.0, np.nan, -2.0, 0.125]), ("edge",), {"edge": names}, {"method": "eap"})


def test_edge_result_becomes_graph():
    graph = graph_json(_edges())
    ids = [n["id"] for n in graph["nodes"]]
    assert len(ids) == len(set(ids)) == 6
    by_id = {n["id"]: n for n in graph["nodes"]}
    assert by_id["embed"]["layer"] == -1 and by_id["logits_in"]["layer"] == 1  # one past the last block
    assert by_id["head_in.0[qkv=0,head=1]"] == {"id": "head_in.0[qkv=0,head=1]", "layer": 0, "pos": None,
                                                "kind": "head_in", "label": "head_in q h1", "head": 1}
    # computation order within a block: head inputs, head outputs, MLP input, MLP output, then the logits
    assert ids == ["embed", "head_in.0[qkv=0,head=1]", "head_out.0[head=1]", "mlp_in.0", "mlp_out.0", "logits_in"]
    weights = [link["weight"] for link in graph["links"]]
    assert weights == [0.5, -0.25, 1.0, None, -2.0, 0.125]
    assert [(l["source"], l["target"]) for l in graph["links"]] == [tuple(e.split("->")) for e in _edges().coords["edge"]]
    with pytest.raises(ValueError, match="edge"):
        graph_json(Result(np.zeros(2), ("site",)))


def test_view_kinds_follow_dims_and_method():
    assert view(_edges())["kind"] == "graph"
    assert view(Result(np.zeros((2, 3)), ("layer", "pos")))["kind"] == "heatmap"
    assert view(Result(np.zeros(3), ("layer",)))["kind"] == "bars"
    assert view(Result(np.array(2.5), ()))["value"] == 2.5
    attention = view(Result(np.full((2, 3, 3), 1 / 3), ("head", "pos", "key_pos"), {"pos": ["0 a", "1 b", "2 c"],
                                                                                     "key_pos": ["0 a", "1 b", "2 c"]}))
    assert attention["kind"] == "attention" and attention["queries"] == ["0 a", "1 b", "2 c"]
    assert attention["lead"] == [{"dim": "head", "labels": ["0", "1"]}]
    table = Result(np.array([0.9, 0.4]), ("ablation",), {"ablation": ["zero", "mean"]},
                   {"method": "faithfulness_table", "kl": {"zero": 0.1, "mean": 0.3}, "circuit": {"zero": 1.0, "mean": 2.0},
                    "ablated": {"zero": -1.0, "mean": 0.0}, "full": 3.0})
    t = view(table)
    assert t["kind"] == "table"
    assert t["rows"][1] == {"label": "mean", "cells": [0.4, 2.0, 0.0, 0.3]}
    with pytest.raises(TypeError, match="Result or a graph"):
        view(np.zeros(3))


def test_per_prompt_heatmap_draws_the_mean_and_keeps_every_prompt():
    rng = np.random.default_rng(0)
    values = rng.normal(size=(2, 4, 3))  # layer x prompt x pos
    values[1, 2, 0] = np.nan
    res = Result(values, ("layer", "prompt", "pos"), {"prompt": ["p0", "p1", "p2", "p3"]})
    v = view(res)
    assert v["rowdim"] == "layer" and v["coldim"] == "pos" and v["prompts"] == ["p0", "p1", "p2", "p3"]
    mean = np.array(v["values"], dtype=float)
    np.testing.assert_allclose(mean, values.mean(axis=1), equal_nan=True)
    per = np.array(v["per_prompt"], dtype=float)  # [layer, pos, prompt]
    np.testing.assert_array_equal(per, np.moveaxis(values, 1, -1))
    assert v["values"][1][0] is None  # NaN travels as null


def test_page_is_self_contained_and_escapes_labels():
    evil = "</script><script>alert(1)</script>"
    res = Result(np.array([[1.0, -np.inf], [np.nan, 2.0]]), ("layer", "pos"), {"pos": ["0 a", evil]},
                 {"metric": evil})
    page = page_html({evil: res}, title=evil)
    assert "<script>alert(1)" not in page
    head = page.split("<body>")[0]
    assert "Content-Security-Policy" in head and "default-src 'none'" in head
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)  # nothing fetched from anywhere
    data = _data(page)
    assert data["title"] == evil and data["views"][0]["cols"] == ["0 a", evil]
    assert data["views"][0]["values"] == [[1.0, -1e308], [None, 2.0]]
    assert asset("explorer.js") in page and asset("explorer.css") in page


def test_to_html_and_notebook_repr():
    res = Result(np.arange(6.0).reshape(2, 3), ("layer", "head"), metadata={"method": "activation_patching"})
    page = res.to_html()
    assert page.startswith("<!DOCTYPE html>") and _data(page)["views"][0]["kind"] == "heatmap"
    frame = res._repr_html_()
    assert frame.startswith("<iframe") and 'sandbox="allow-scripts"' in frame and "srcdoc=" in frame
    assert "<script" not in frame  # the page is escaped into the attribute, not run in the notebook itself


def test_report_writes_the_explorer_next_to_the_static_page(tmp_path):
    graph = {"nodes": [{"id": "a", "layer": 0, "pos": None, "kind": "x"}], "links": []}
    out = write_report({"heads": Result(np.ones((2, 2)), ("layer", "head")), "edges": _edges()}, tmp_path,
                       title="T", context={"model": "m"}, graphs={"attribution": graph}, pictures=False)
    page = (out / EXPLORER).read_text()
    data = _data(page)
    assert [v["kind"] for v in data["views"]] == ["heatmap", "graph", "graph"]
    assert data["context"] == {"model": "m"}
    assert f'href="{EXPLORER}"' in (out / "index.html").read_text()
    assert json.loads((out / "attribution.graph.json").read_text()) == graph


def test_assets_are_package_data():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    globs = config["package-data"]["crosspatch.results.html"]
    assert "crosspatch.results.html" in config["packages"]
    assets = ROOT / "core" / "results" / "html" / "assets"
    for path in assets.iterdir():
        assert any(fnmatch(f"assets/{path.name}", g) for g in globs), f"{path.name} would not be installed"


def test_every_method_result_renders():
    """Results of the methods on a tiny GPT-2 each get a drawing (not the fallback) and a valid page."""
    pytest.importorskip("transformers")
    import torch

    import crosspatch as cp
    from conftest import tiny_gpt2
    from crosspatch.methods.edges import acdc, eap
    from crosspatch.study.analyses import attention_patterns

    m = cp.wrap(tiny_gpt2())
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(1, 100, (2, 6), generator=g)
    corrupt = clean.clone()
    corrupt[:, 2] = (clean[:, 2] + 7) % 100
    metric = cp.metrics.logit_diff(torch.tensor([3, 4]), torch.tensor([5, 6]))
    results = {
        "heatmap": cp.activation_patching(m, clean, corrupt, "resid_pre.*[pos=*]", metric),
        "heatmap ": cp.attribution_patching(m, clean, corrupt, "head_out.*[head=*]", metric),
        "bars ": cp.path_patching(m, clean, corrupt, "head_out.0[head=*]", "logits_in", metric),
        "graph": eap(m, clean, corrupt, metric),
        "graph ": acdc(m, clean, corrupt, threshold=0.05),
        "table": cp.faithfulness_table(m, clean, ["head_out.1[head=0]"], "head_out.*[head=*]", metric),
        "bars": cp.faithfulness_curve(m, clean, ["head_out.1[head=0]", "head_out.0[head=1]"], "head_out.*[head=*]",
                                      metric, progress=False),
        "attention": attention_patterns(m, clean[:1]),
    }
    for kind, res in results.items():
        v = view(res)
        assert v["kind"] == kind.strip(), (kind, res.dims, res.metadata.get("method"))
        data = _data(res.to_html())
        assert data["views"][0]["kind"] == kind.strip()


def test_leading_dims_get_a_selector():
    res = Result(np.arange(24.0).reshape(2, 3, 4), ("layer", "pos", "head"))
    v = view(res)
    assert v["kind"] == "heatmap" and v["lead"] == [{"dim": "layer", "labels": ["0", "1"]}]
    assert (v["rowdim"], v["coldim"]) == ("pos", "head") and v["values"][1][2][3] == 23.0


def test_neuronpedia_graphs_are_drawn_in_the_same_schema():
    graph = {
        "metadata": {"slug": "ioi"},
        "nodes": [
            {"node_id": "3_7_5", "layer": "3", "ctx_idx": 5, "feature_type": "logit", "clerp": 'Output " Mary"'},
            {"node_id": "0_12_2", "layer": "0", "ctx_idx": 2, "feature_type": "cross layer transcoder", "clerp": ""},
            {"node_id": "E_9_1", "layer": "E", "ctx_idx": 1, "feature_type": "embedding", "clerp": ""},
            {"node_id": "1_-1_2", "layer": "1", "ctx_idx": 2, "feature_type": "mlp reconstruction error"},
        ],
        "links": [{"source": "E_9_1", "target": "0_12_2", "weight": 0.5},
                  {"source": "0_12_2", "target": "3_7_5", "weight": -1.25}],
    }
    v = view(graph, "attribution graph")
    nodes = v["graph"]["nodes"]
    assert [(n["id"], n["layer"], n["pos"], n["kind"]) for n in nodes] == [
        ("E_9_1", -1, 1, "embedding"), ("0_12_2", 0, 2, "cross_layer_transcoder"),
        ("1_-1_2", 1, 2, "mlp_reconstruction_error"), ("3_7_5", 3, 5, "logit")]
    assert nodes[-1]["label"] == 'Output " Mary"' and nodes[1]["label"] == "0_12_2"
    assert v["graph"]["links"] == graph["links"] and v["graph"]["metadata"] == {"slug": "ioi"}
    ours = graph_json(_edges())
    assert view(ours)["graph"]["nodes"] == ours["nodes"]  # already in the schema: unchanged
