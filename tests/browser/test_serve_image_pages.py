"""``crosspatch serve``'s image and feature panels in a real browser: on a tiny VAE the steering
slider changes the reconstruction the page draws to the one Python computes for the same
intervention, and a patch between two shapes images draws the patched reconstruction; on a tiny
CLIP the slider and a patch change the similarity numbers to Python's; on a tiny GPT-2 a
transcoder feature's slider shows the distribution Python computes with its decoder row. No
console errors, no request beyond the server."""

from __future__ import annotations

import types

import pytest
from browser_pages import chrome, page, page_number  # noqa: F401  (fixtures)

pytest.importorskip("starlette", reason="crosspatch serve needs the serve extra (starlette, uvicorn)")
pytest.importorskip("uvicorn", reason="crosspatch serve needs the serve extra (starlette, uvicorn)")


def _by(css):
    from selenium.webdriver.common.by import By

    return By.CSS_SELECTOR, css


def _one(page, css):
    found = page.driver.find_elements(*_by(css))
    return found[0] if found else None


def _slide(page, css, value):
    slider = page.wait(lambda: _one(page, css + ":not([disabled])"), 30, "the slider")
    page.driver.execute_script("arguments[0].value = arguments[1]; arguments[0].dispatchEvent(new Event('input'))",
                               slider, value)


def _type(page, css, text):
    field = page.driver.find_element(*_by(css))
    field.clear()
    field.send_keys(text)


def _select(page, css, value):
    from selenium.webdriver.support.ui import Select

    Select(page.driver.find_element(*_by(css))).select_by_value(str(value))


@pytest.fixture(scope="module")
def image_servers():
    from test_serve_images import image_sessions

    from crosspatch.serve.server import start_in_thread

    sessions = image_sessions()
    running = {kind: start_in_thread(session) for kind, session in sessions.items()}
    yield {kind: (running[kind], sessions[kind]) for kind in sessions}
    for server in running.values():
        server.stop()


def test_vae_slider_and_patch_draw_what_python_computes(image_servers, page):
    server, session = image_servers["vae"]
    page.open(server.url + "/")
    page.wait(lambda: _one(page, "#steer-out img"), 30, "the reconstruction")
    _select(page, "#direction", "z1")
    page.driver.find_element(*_by("#steer-vector")).click()
    page.wait(lambda: _one(page, "#steer-out[data-alpha='0']"), 30, "alpha 0")
    axis = {"site": "latent.z", "intervention": {"kind": "add", "vector": [0, 1, 0, 0], "alpha": 1}}
    shown = {}
    for alpha in (2, -1.5):
        _slide(page, "#steer-alpha", alpha)
        page.wait(lambda: _one(page, f"#steer-out[data-alpha='{alpha}']"), 30, f"alpha {alpha}")
        shown[alpha] = page.driver.find_element(*_by("#steer-shown")).get_attribute("src")
        expected = session.image({"image": 0, "interventions": [
            {**axis, "intervention": {**axis["intervention"], "alpha": alpha}}]})
        assert shown[alpha] == expected["output"]  # the same PNG, byte for byte
    assert shown[2] != shown[-1.5] != expected["base"]
    page.screenshot("serve_vae_steer")

    pair = session.gallery.pairs[0]  # picking a pair sets both images
    _select(page, "#pair-pick", 0)
    assert (page.driver.find_element(*_by("#image-a")).get_attribute("value"),
            page.driver.find_element(*_by("#image-b")).get_attribute("value")) == (str(pair["a"]), str(pair["b"]))
    _select(page, "#image-a", 0)
    _select(page, "#image-b", 3)
    _type(page, "#patch-site", "decoder.block.0")
    page.driver.find_element(*_by("#patch-run")).click()
    page.wait(lambda: _one(page, "#patch-out[data-site='decoder.block.0']"), 30, "the patch")
    expected = session.image({"image": 0, "interventions": [
        {"site": "decoder.block.0", "intervention": {"kind": "patch", "source": {"image": 3}}}]})
    assert page.driver.find_element(*_by("#patch-shown")).get_attribute("src") == expected["output"]
    assert expected["output"] != expected["base"]
    page.screenshot("serve_vae_patch")
    assert page.console_errors() == []
    assert page.foreign_requests(server.url) == []


def _after(page):
    """The CLIP table's rows as (caption, the 'after' column's text)."""
    rows = page.driver.find_elements(*_by("#steer-out tr[data-caption], #patch-out tr[data-caption]"))
    return [(r.get_attribute("data-caption"), r.find_element(*_by("td.cp-after")).text) for r in rows]


def test_clip_slider_and_patch_show_pythons_similarities(image_servers, page):
    server, session = image_servers["clip"]
    page.open(server.url + "/")
    page.wait(lambda: _one(page, "#steer-out tr[data-caption]"), 30, "the similarities")
    _select(page, "#image-a", 2)
    _select(page, "#image-b", 5)
    page.wait(lambda: _one(page, "#steer-out tr[data-caption]"), 30, "image A's similarities")
    captions = page.driver.find_element(*_by("#captions")).get_attribute("value").split("\n")
    assert captions == session.captions_for(2)
    _select(page, "#steer-site", "vision.resid_post.1")
    page.driver.find_element(*_by("#steer-vector")).click()
    page.wait(lambda: _one(page, "#steer-out[data-alpha='0']"), 30, "the vector")
    _slide(page, "#steer-alpha", 4)
    page.wait(lambda: _one(page, "#steer-out[data-alpha='4']"), 30, "alpha 4")
    vector = session.steering({"site": "vision.resid_post.1", "image": 2, "toward": 5})
    expected = session.image({"image": 2, "captions": captions, "interventions": [
        {"site": "vision.resid_post.1", "intervention": {**vector["intervention"], "alpha": 4}}]})
    assert _after(page) == [(c, page_number(v)) for c, v in zip(captions, expected["patched"])]
    assert [page_number(v) for v in expected["patched"]] != [page_number(v) for v in expected["base"]]
    page.screenshot("serve_clip_steer")

    _type(page, "#patch-site", "vision.resid_post.0")
    page.driver.find_element(*_by("#patch-run")).click()
    page.wait(lambda: _one(page, "#patch-out[data-site='vision.resid_post.0']"), 30, "the patch")
    expected = session.image({"image": 2, "captions": captions, "interventions": [
        {"site": "vision.resid_post.0", "intervention": {"kind": "patch", "source": {"image": 5}}}]})
    rows = page.driver.find_elements(*_by("#patch-out tr[data-caption]"))
    assert [r.find_element(*_by("td.cp-after")).text for r in rows] == [page_number(v) for v in expected["patched"]]
    page.screenshot("serve_clip_patch")

    # A sweep streams in; clicking a cell patches that site.
    _type(page, "#sites", "vision.resid_post.*[pos=*]")
    page.driver.find_element(*_by("#run")).click()
    page.wait(lambda: page.driver.find_element(*_by("#sweep-status")).text == "done", 60, "the sweep")
    cells = page.driver.find_elements(*_by("#result rect.cp-cell"))
    assert len(cells) == 2 * 17  # two blocks x (class token + 16 patches)
    next(c for c in cells if c.get_attribute("data-r") == "1" and c.get_attribute("data-c") == "0").click()
    page.wait(lambda: _one(page, "#patch-out[data-site='vision.resid_post.1[pos=0]']"), 30, "the clicked site's patch")
    expected = session.image({"image": 2, "captions": captions, "interventions": [
        {"site": "vision.resid_post.1[pos=0]", "intervention": {"kind": "patch", "source": {"image": 5}}}]})
    rows = page.driver.find_elements(*_by("#patch-out tr[data-caption]"))
    assert [r.find_element(*_by("td.cp-after")).text for r in rows] == [page_number(v) for v in expected["patched"]]
    page.screenshot("serve_clip_sweep")
    assert page.console_errors() == []
    assert page.foreign_requests(server.url) == []


@pytest.fixture(scope="module")
def feature_server(tmp_path_factory):
    pytest.importorskip("transformers")
    from fake_zoo import build
    from test_serve_features import tiny_dictionaries

    from crosspatch.serve.server import start_in_thread, task_examples
    from crosspatch.serve.session import Session
    from crosspatch.zoo.sources import wrap

    folder = tmp_path_factory.mktemp("serve-features")
    build(folder / "ckpt", types.SimpleNamespace(seed=0))
    dictionaries, _ = tiny_dictionaries(folder)
    session = Session(wrap(str(folder / "ckpt")), "tiny", task_examples("ioi", 2), dictionaries)
    server = start_in_thread(session)
    yield server, session
    server.stop()


def test_feature_slider_shows_pythons_distribution(feature_server, page):
    server, session = feature_server
    page.open(server.url + "/")
    page.wait(lambda: _one(page, "#feature-dict option"), 30, "the feature picker")
    _select(page, "#feature-dict", "plt")
    _select(page, "#feature-source", 1)
    index = page.driver.find_element(*_by("#feature-index"))
    index.clear()
    index.send_keys("5")
    page.driver.find_element(*_by("#feature-load")).click()
    page.wait(lambda: _one(page, "#feature-dist[data-alpha='0']"), 30, "the feature")
    prompt = session.example["corrupt"]
    shown_tokens = [s.text for s in page.driver.find_elements(*_by("#feature-tokens .cp-ftok"))]
    assert shown_tokens == session.tokens(prompt)
    _slide(page, "#feature-alpha", 3)
    panel = page.wait(lambda: _one(page, "#feature-dist[data-alpha='3']"), 30, "alpha 3")
    rows = [(r.get_attribute("data-token"), r.find_elements(*_by("td"))[-1].text)
            for r in panel.find_elements(*_by("tr[data-token]"))]
    feature = session.feature({"dictionary": "plt", "source": 1, "feature": 5})
    [steer] = feature["interventions"]
    expected = session.predict({"prompt": prompt, "interventions": [
        {"site": steer["site"], "intervention": {**steer["intervention"], "alpha": 3}}]})
    assert rows == [(t["token"], page_number(t["p"])) for t in expected["patched"]]
    assert expected["patched"] != expected["base"]
    page.screenshot("serve_feature")
    assert page.console_errors() == []
    assert page.foreign_requests(server.url) == []


def _saved_study(page, timeout=30.0):
    """The study file the page's "Save as study.toml" downloaded."""
    folder = page.driver.download_dir
    for old in folder.glob("study*.toml"):
        old.unlink()
    page.driver.find_element(*_by("#save-study")).click()
    found = page.wait(lambda: sorted(folder.glob("study*.toml")), timeout, "the downloaded study file")
    return found[0].read_text(encoding="utf-8")


def test_vae_bars_patch_their_site_and_the_sweep_saves_as_a_study(image_servers, page):
    """A sweep with one wildcard draws bars; clicking one patches that site (the latent axis, the block), as
    a heatmap cell does, and the page draws the PNG Python computes; the sweep saves as a study file."""
    import tomllib

    server, session = image_servers["vae"]
    page.open(server.url + "/")
    page.wait(lambda: _one(page, "#steer-out img"), 30, "the reconstruction")
    pair = next(p for p in session.gallery.pairs if p["factor"] == "colour")
    _select(page, "#pair-pick", session.gallery.pairs.index(pair))
    for pattern, index, site in (("latent.z[dim=*]", 2, "latent.z[dim=2]"), ("encoder.block.*", 1, "encoder.block.1")):
        _type(page, "#sites", pattern)
        page.driver.find_element(*_by("#run")).click()
        page.wait(lambda: page.driver.find_element(*_by("#sweep-status")).text == "done", 60, "the sweep")
        bars = page.driver.find_elements(*_by("#result rect.cp-bar"))
        assert len(bars) == (4 if "latent" in pattern else 3)
        assert f"{site} (click: patch it)" in page.hover(bars[index])
        bars[index].click()
        page.wait(lambda: _one(page, f"#patch-out[data-site='{site}']"), 30, f"the patch at {site}")
        expected = session.image({"image": pair["a"], "interventions": [
            {"site": site, "intervention": {"kind": "patch", "source": {"image": pair["b"]}}}]})
        assert page.driver.find_element(*_by("#patch-shown")).get_attribute("src") == expected["output"]
        assert page.driver.find_element(*_by("#patch-site")).get_attribute("value") == site
        assert "cp-picked" in bars[index].get_attribute("class")
    assert expected["output"] != expected["base"]
    page.screenshot("serve_vae_bars")

    study = tomllib.loads(_saved_study(page))
    assert study["model"] == session.name and study["metric"] == "closeness"
    assert study["inputs"]["pair"] == {"factor": "colour", "split": "train", "seed": 0, "n": 1, "index": 0}
    assert study["analysis"][0]["sites"] == "encoder.block.*"
    assert "saved study.toml" in page.driver.find_element(*_by("#sweep-status")).text
    assert page.console_errors() == []
    assert page.foreign_requests(server.url) == []
