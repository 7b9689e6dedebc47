"""The one-page report: files per result, an index that shows every result, and escaping."""

from __future__ import annotations

import numpy as np
import pytest

from crosspatch import Result
from crosspatch.results.report import top_sites, write_report


def _heads() -> Result:
    values = np.array([[0.1, -0.9, 0.0], [0.5, 0.2, np.nan]])
    meta = {"method": "activation_patching", "metric": "logit_diff", "sites": "head_out.*[head=*]",
            "baseline": {"clean": 2.0, "corrupt": -1.0}, "n_prompts": 4}
    return Result(values, ("layer", "head"), metadata=meta)


def _resid() -> Result:
    meta = {"metric": "logit_diff", "sites": "resid_pre.*[pos=*]"}
    return Result(np.arange(6.0).reshape(2, 3), ("layer", "pos"), {"pos": ["0 When", "1 <John>", "2 &"]}, meta)


def test_files_and_index(tmp_path):
    results = {"heads": _heads(), "resid pre/odd name": _resid(), "cube": Result(np.ones((2, 2, 2)), ("a", "b", "c"))}
    out = write_report(results, tmp_path / "rep", title="IOI", context={"model": "m", "seed": 0})
    assert out == tmp_path / "rep"
    names = {p.name for p in out.iterdir()}
    assert {"index.html", "heads.png", "heads.json", "heads.csv"} <= names
    assert {"resid_pre_odd_name.png", "resid_pre_odd_name.json", "resid_pre_odd_name.csv"} <= names
    assert {"cube.json", "cube.csv"} <= names and "cube.png" not in names  # 3-D: table only
    assert Result.load(out / "heads.json") == results["heads"]
    page = (out / "index.html").read_text()
    for name in ("heads", "resid pre/odd name", "cube"):
        assert f"<h2>{name}</h2>" in page
    for link in ("heads.png", "heads.json", "heads.csv", "resid_pre_odd_name.png"):
        assert f'"{link}"' in page
    assert "<th>model</th><td>m</td>" in page
    assert "head_out.0[head=1]" in page  # the largest |value| is rebuilt as a concrete site
    assert "1 &lt;John&gt;" in page  # coordinate labels are escaped too
    assert "http" not in page.split("<body>")[1]  # nothing external


def test_malicious_title_and_context_are_escaped(tmp_path):
    evil = '<script>alert("x")</script>'
    out = write_report({evil: _heads()}, tmp_path, title=evil, context={evil: {"k": evil}})
    page = (out / "index.html").read_text()
    assert "<script>" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    assert (out / "script_alert_x_script.png").exists()


def test_top_sites_order_and_nan():
    rows = top_sites(_heads(), k=3)
    assert [r["value"] for r in rows] == [-0.9, 0.5, 0.2]
    assert rows[0] == {"site": "head_out.0[head=1]", "layer": 0, "head": 1, "value": -0.9}
    res = Result(np.array([1.0, -3.0]), ("site",), {"site": ["a.0", "b.1"]})
    assert top_sites(res)[0]["site"] == "b.1"


def test_empty_and_wrong_types(tmp_path):
    with pytest.raises(ValueError):
        write_report({}, tmp_path, title="t")
    with pytest.raises(TypeError):
        write_report({"x": np.zeros(3)}, tmp_path, title="t")  # type: ignore[dict-item]
