"""``crosspatch serve`` in a real browser, on a tiny GPT-2 checkpoint: a sweep streams in, a click
patches a site and the page shows the distribution Python computes for the same intervention, the
steering slider moves it, and two tabs share the one worker: the second request waits its turn, and
a queued request can be cancelled."""

from __future__ import annotations

import threading

import pytest
from browser_pages import chrome, page, page_number  # noqa: F401  (fixtures)

pytest.importorskip("transformers")
pytest.importorskip("starlette", reason="crosspatch serve needs the serve extra (starlette, uvicorn)")
pytest.importorskip("uvicorn", reason="crosspatch serve needs the serve extra (starlette, uvicorn)")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from served_model import serve_tiny_model

    yield from serve_tiny_model(tmp_path_factory)


def _by(css):
    from selenium.webdriver.common.by import By

    return By.CSS_SELECTOR, css


def _one(page, css):
    found = page.driver.find_elements(*_by(css))
    return found[0] if found else None


def _status(page):
    return page.driver.find_element(*_by("#status")).text


def _rows(panel):
    """The distribution table's rows as (token, last column's number)."""
    out = []
    for row in panel.find_elements(*_by("tr[data-token]")):
        cells = row.find_elements(*_by("td"))
        out.append((row.get_attribute("data-token"), cells[-1].text))
    return out


def test_sweep_patch_and_steer(served, page):
    server, session = served
    page.open(server.url + "/")
    page.wait(lambda: page.driver.find_elements(*_by("#run")), what="the form")
    example = session.example
    assert page.driver.find_element(*_by("#clean")).get_attribute("value") == example["clean"]

    page.driver.find_element(*_by("#run")).click()
    page.wait(lambda: _status(page) == "done", 60, "the sweep")
    n_pos = len(session.tokens(example["clean"]))
    cells = page.driver.find_elements(*_by("#result rect.cp-cell"))
    assert len(cells) == 2 * n_pos  # resid_pre.*[pos=*] on a 2-layer model

    # Click a site: the page shows what Python computes for the same patch.
    cell = next(c for c in cells if c.get_attribute("data-r") == "1" and c.get_attribute("data-c") == str(n_pos - 5))
    cell.click()
    site = f"resid_pre.1[pos={n_pos - 5}]"
    panel = page.wait(lambda: _one(page, f"#patch-dist[data-site='{site}']"), 30, "the patch")
    shown = _rows(panel)
    expected = session.predict({"prompt": example["corrupt"], "interventions": [
        {"site": site, "intervention": {"kind": "patch", "source": example["clean"]}}]})
    assert shown == [(t["token"], page_number(t["p"])) for t in expected["patched"]]
    assert expected["patched"] != expected["base"]  # the patch changed the distribution
    page.screenshot("serve_patch")

    # Steering: compute the vector, drag to 4, and compare with Python's Add at the same strength.
    page.driver.find_element(*_by("#steer-vector")).click()
    slider = page.wait(lambda: _one(page, "#steer-alpha:not([disabled])"), 30, "the vector")
    page.wait(lambda: page.driver.find_elements(*_by("#steer-dist[data-alpha='0']")), 30, "alpha 0")
    at_zero = _rows(page.driver.find_element(*_by("#steer-dist")))
    page.driver.execute_script("arguments[0].value = 4; arguments[0].dispatchEvent(new Event('input'))", slider)
    panel = page.wait(lambda: _one(page, "#steer-dist[data-alpha='4']"), 30, "alpha 4")
    at_four = _rows(panel)
    vector = session.steering({"clean": example["clean"], "corrupt": example["corrupt"],
                               "site": "resid_pre.1"})["intervention"]
    expected = session.predict({"prompt": example["corrupt"], "interventions": [
        {"site": "resid_pre.1", "intervention": {**vector, "alpha": 4.0}}]})
    assert at_four == [(t["token"], page_number(t["p"])) for t in expected["patched"]]
    assert at_four != at_zero
    page.screenshot("serve_steer")

    # The task's pairs: picking the third fills the prompts and answers with it.
    from selenium.webdriver.support.ui import Select

    Select(page.driver.find_element(*_by("#pair"))).select_by_index(2)
    third = session.examples[2]
    assert third != session.examples[0]
    for key in ("clean", "corrupt", "answer", "distractor"):
        assert page.driver.find_element(*_by(f"#{key}")).get_attribute("value") == third[key]
    assert page.console_errors() == []
    assert page.foreign_requests(server.url) == []


def test_a_bar_patches_its_site(served, page):
    """A sweep over one layer's heads draws bars; clicking head 1's patches head_out.1[head=1]."""
    server, session = served
    example = session.example
    page.open(server.url + "/")
    page.wait(lambda: page.driver.find_elements(*_by("#run")), what="the form")
    page.driver.find_element(*_by("#sites")).clear()
    page.driver.find_element(*_by("#sites")).send_keys("head_out.1[head=*]")
    page.driver.find_element(*_by("#run")).click()
    page.wait(lambda: _status(page) == "done", 60, "the sweep")
    bars = page.driver.find_elements(*_by("#result rect.cp-bar"))
    assert len(bars) == 2 and not page.driver.find_elements(*_by("#result rect.cp-cell"))
    bars[1].click()
    site = "head_out.1[head=1]"
    panel = page.wait(lambda: _one(page, f"#patch-dist[data-site='{site}']"), 30, "the patch")
    expected = session.predict({"prompt": example["corrupt"], "interventions": [
        {"site": site, "intervention": {"kind": "patch", "source": example["clean"]}}]})
    assert _rows(panel) == [(t["token"], page_number(t["p"])) for t in expected["patched"]]
    assert expected["patched"] != expected["base"]
    assert page.console_errors() == []


def test_two_tabs_queue_and_cancel(served, page):
    server, _ = served
    jobs = server.server.config.app.state.jobs
    release = threading.Event()
    blocker = jobs.submit("test", lambda job: release.wait(60))
    driver = page.driver
    try:
        page.open(server.url + "/")
        first = driver.current_window_handle
        page.wait(lambda: driver.find_elements(*_by("#run")), what="the first tab")
        driver.find_element(*_by("#run")).click()
        page.wait(lambda: _status(page) == "queued behind 1 job(s)", 20, "the first tab's request to queue")

        driver.switch_to.new_window("tab")
        second = driver.current_window_handle
        driver.get(server.url + "/")
        page.wait(lambda: driver.find_elements(*_by("#run")), what="the second tab")
        driver.find_element(*_by("#sites")).clear()
        driver.find_element(*_by("#sites")).send_keys("head_out.*[head=*]")
        driver.find_element(*_by("#run")).click()
        page.wait(lambda: _status(page) == "queued behind 2 job(s)", 20, "the second tab's request to queue")
        driver.find_element(*_by("#cancel")).click()
        page.wait(lambda: _status(page) == "cancelled", 20, "the cancellation")
        driver.find_element(*_by("#run")).click()  # asked again: queued behind the first tab's
        page.wait(lambda: _status(page) == "queued behind 2 job(s)", 20, "the second request to queue")
    finally:
        release.set()
    blocker.wait(30)
    page.wait(lambda: _status(page) == "done", 60, "the second tab's sweep")
    assert len(driver.find_elements(*_by("#result rect.cp-cell"))) == 2 * 2  # 2 layers x 2 heads
    page.screenshot("serve_second_tab")
    driver.close()
    driver.switch_to.window(first)
    page.wait(lambda: _status(page) == "done", 60, "the first tab's sweep")
    assert driver.find_elements(*_by("#result rect.cp-cell"))
    assert page.console_errors() == []
    assert second not in driver.window_handles
