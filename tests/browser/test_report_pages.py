"""The interactive report in a real browser: it loads with no console error and no request beyond the
file itself, hovering shows each value, a click shows every prompt, the pruning slider prunes, the
attention heads switch, and a notebook's frame draws the same page."""

from __future__ import annotations

import numpy as np
import pytest
from browser_pages import chrome, page, page_number  # noqa: F401  (fixtures)

from crosspatch import Result
from crosspatch.results.report import EXPLORER, write_report

TOKENS = ["0 When", "1 Mary", "2 and", "3 John", "4 went"]


def _results() -> dict[str, Result]:
    rng = np.random.default_rng(7)
    per_prompt = rng.normal(size=(2, 3, 5))  # layer x prompt x pos
    resid = Result(per_prompt, ("layer", "prompt", "pos"), {"prompt": ["p one", "p two", "p three"], "pos": TOKENS},
                   {"method": "activation_patching", "metric": "logit_diff", "sites": "resid_pre.*[pos=*]"})
    heads = Result(np.array([[0.5, -0.25, 0.0], [1.5, 0.125, -2.0]]), ("layer", "head"), {},
                   {"method": "activation_patching", "sites": "head_out.*[head=*]"})
    raw = rng.random((2, 2, 5, 5))
    pattern = np.tril(raw) / np.tril(raw).sum(-1, keepdims=True)
    attention = Result(pattern, ("layer", "head", "pos", "key_pos"), {"pos": TOKENS, "key_pos": TOKENS},
                       {"method": "attention"})
    senders = ["embed", "head_out.0[head=0]", "head_out.0[head=1]", "mlp_out.0"]
    receivers = ["head_in.0[qkv=0,head=0]", "mlp_in.0", "logits_in"]
    names = [f"{s}->{r}" for s in senders for r in receivers if not (s != "embed" and r.startswith("head_in"))]
    edges = Result(np.linspace(-1, 1.5, len(names)), ("edge",), {"edge": names}, {"method": "eap"})
    table = Result(np.array([0.93, 0.41]), ("ablation",), {"ablation": ["zero", "mean"]},
                   {"method": "faithfulness_table", "kl": {"zero": 0.2, "mean": 0.6},
                    "circuit": {"zero": 1.0, "mean": 2.0}, "ablated": {"zero": 0.0, "mean": 0.5}})
    return {"resid_pre": resid, "heads": heads, "attention": attention, "edges": edges, "faithfulness": table}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    results = _results()
    write_report(results, out, title="Browser test", context={"model": "none"}, pictures=False)
    return out, results


def _section(driver, name):
    from selenium.webdriver.common.by import By

    return next(s for s in driver.find_elements(By.CSS_SELECTOR, "section.cp-view")
                if s.find_element(By.TAG_NAME, "h2").text == name)


def test_report_loads_offline_and_hover_shows_values(report, page):
    from selenium.webdriver.common.by import By

    out, results = report
    url = (out / EXPLORER).as_uri()
    page.open(url)
    page.wait(lambda: page.driver.find_elements(By.CSS_SELECTOR, "section.cp-view"), what="the sections")
    assert len(page.driver.find_elements(By.CSS_SELECTOR, "section.cp-view")) == 5

    heads = _section(page.driver, "heads")
    cells = heads.find_elements(By.CSS_SELECTOR, "rect.cp-cell")
    assert len(cells) == 6
    for cell in (cells[1], cells[5]):
        r, c = int(cell.get_attribute("data-r")), int(cell.get_attribute("data-c"))
        text = page.hover(cell)
        value = results["heads"].values[r, c]
        assert f"layer {r} · head {c}" in text and f"value {page_number(value)}" in text
        assert f"head_out.{r}[head={c}]" in text  # the concrete site of the cell

    # per prompt: the heatmap is the mean over prompts, a click lists every prompt's value
    resid = _section(page.driver, "resid_pre")
    cell = resid.find_elements(By.CSS_SELECTOR, "rect.cp-cell")[5 + 3]  # layer 1, pos 3
    assert "3 John" in page.hover(cell)
    assert f"value {page_number(results['resid_pre'].values[1, :, 3].mean())}" in page.hover(cell)
    cell.click()
    bars = resid.find_elements(By.CSS_SELECTOR, ".cp-detail rect.cp-bar")
    assert len(bars) == 3
    text = page.hover(bars[2])
    assert f"value {page_number(results['resid_pre'].values[1, 2, 3])}" in text and "prompt p three" in text
    page.screenshot("report")

    assert page.console_errors() == []
    assert page.foreign_requests(url) == []


def test_graph_slider_prunes_and_attention_heads_switch(report, page):
    from selenium.webdriver.common.by import By

    out, results = report
    url = (out / EXPLORER).as_uri()
    page.open(url + "#keep3=4")
    graph = page.wait(lambda: _section(page.driver, "edges"), what="the graph")
    links = graph.find_elements(By.CSS_SELECTOR, "path.cp-link")
    assert len(links) == 4  # the slider's value came from the URL
    weights = sorted((abs(float(l.get_attribute("data-weight"))) for l in links), reverse=True)
    expected = sorted(np.abs(results["edges"].values), reverse=True)[:4]
    np.testing.assert_allclose(weights, expected)
    slider = graph.find_element(By.CSS_SELECTOR, "input.cp-slider")
    page.driver.execute_script("arguments[0].value = 9; arguments[0].dispatchEvent(new Event('input'))", slider)
    assert len(graph.find_elements(By.CSS_SELECTOR, "path.cp-link")) == 9
    assert graph.find_element(By.CSS_SELECTOR, ".cp-count").text.startswith(f"9 of {results['edges'].values.size}")
    assert "keep3=9" in page.driver.current_url

    attention = _section(page.driver, "attention")
    thumbs = attention.find_elements(By.CSS_SELECTOR, "button.cp-thumb-box")
    assert len(thumbs) == 2
    thumbs[1].click()
    cell = [c for c in attention.find_elements(By.CSS_SELECTOR, "rect.cp-cell")
            if c.get_attribute("data-r") == "4" and c.get_attribute("data-c") == "1"][0]
    text = page.hover(cell)
    assert "query 4 went → key 1 Mary" in text
    assert f"attention {page_number(results['attention'].values[0, 1, 4, 1])}" in text
    table = _section(page.driver, "faithfulness")
    row = table.find_elements(By.CSS_SELECTOR, "tr")[2]
    assert [td.text for td in row.find_elements(By.CSS_SELECTOR, "td.cp-num")] == ["0.41", "2", "0.5", "0.6"]
    assert row.find_element(By.CSS_SELECTOR, ".cp-fbar").get_attribute("style").startswith("width: 33px")  # 80 px = 1
    page.screenshot("report_graph")
    assert page.console_errors() == []
    assert page.foreign_requests(url) == []


def test_notebook_frame_draws_the_result(tmp_path, page):
    from selenium.webdriver.common.by import By

    res = _results()["heads"]
    path = tmp_path / "notebook.html"
    path.write_text(f"<!DOCTYPE html><html><body>{res._repr_html_()}</body></html>")
    page.open(path.as_uri())
    frame = page.wait(lambda: page.driver.find_elements(By.TAG_NAME, "iframe"), what="the frame")[0]
    page.driver.switch_to.frame(frame)
    try:
        cells = page.wait(lambda: page.driver.find_elements(By.CSS_SELECTOR, "rect.cp-cell"), what="the cells")
        assert len(cells) == 6
    finally:
        page.driver.switch_to.default_content()
    assert page.console_errors() == []
