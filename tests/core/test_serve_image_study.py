"""An image sweep on the served page, saved as a study file, runs with ``crosspatch run`` to the
numbers the page showed, bit for bit, and ``crosspatch run FOLDER --check`` reproduces the folder.

The models are the tiny untrained VAE and CLIP of test_serve_images, served as zoo entries of a test
plugin (packaged, nothing trained), so the study file names them as it would ``shapes-vae``. Cases:
a VAE's latent sweep on a counterfactual pair (saved as ``pair``), a VAE sweep over encoder blocks
(one layer per streamed step on the page, one call in the study) on a train and a held-out image
(saved as ``image`` and ``toward``), and a CLIP sweep over the residual entering each block at each
position; the image tables also draw the gallery's own images, pixel for pixel."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest
import torch

pytest.importorskip("starlette", reason="crosspatch serve needs the serve extra (starlette, uvicorn)")
pytest.importorskip("uvicorn", reason="crosspatch serve needs the serve extra (starlette, uvicorn)")

from test_serve import _events, _post  # noqa: E402  (after the skips)
from test_serve_images import tiny_clip, tiny_vae  # noqa: E402

VAE, CLIP = "fake-shapes-vae", "fake-shapes-clip"


def image_zoo_plugin() -> types.ModuleType:
    """A plugin registering the tiny VAE and CLIP as packaged zoo models (built from their seeds on load)."""
    from crosspatch.plugins.hookspecs import hookimpl
    from crosspatch.zoo.store import Loaded, ZooModel

    module = types.ModuleType("fake_image_zoo_plugin")

    @hookimpl
    def register_models(register):
        register(ZooModel(VAE, "tiny untrained ConvVAE for tests", "vae", "shapes", None,
                          lambda folder: Loaded(tiny_vae(), None), trains=False))
        register(ZooModel(CLIP, "tiny untrained open_clip CLIP for tests", "open_clip", "shapes", None,
                          lambda folder: Loaded(*tiny_clip()), trains=False))

    module.register_models = register_models
    return module


@pytest.fixture(scope="module")
def served():
    pytest.importorskip("open_clip")
    from crosspatch.plugins.registry import get_registry, reset_registry
    from crosspatch.serve.server import load_session, start_in_thread

    reset_registry()
    get_registry().register(image_zoo_plugin(), "fake-image-zoo")
    running = {}
    try:
        for name in (VAE, CLIP):
            session = load_session(name)
            running[session.kind] = (start_in_thread(session), session)
        yield running
    finally:
        for server, _ in running.values():
            server.stop()
        reset_registry()


def _saved_and_run(server, request, tmp_path, capsys):
    """Sweep on the page, save the study, run it: (the page's values, the study file's text, the run's Result, out)."""
    from crosspatch.cli import app as cli
    from crosspatch.results.result import Result

    status, body = _post(server.url + "/api/jobs", {"kind": "sweep", **request})
    assert status == 202, body
    events = _events(server.url + json.loads(body)["events"])
    assert events[-1][0] == "result", events[-1]
    shown = np.array(events[-1][1]["data"]["view"]["values"], dtype=float)
    status, text = _post(server.url + "/api/study", request)
    assert status == 200, text
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "study.toml"
    # no PNGs (they take seconds to draw and do not enter the results or their digests)
    path.write_text(text.replace("pictures = true", "pictures = false"), encoding="utf-8")
    out = tmp_path / "report"
    assert cli.main(["run", str(path), "--out", str(out)]) == 0, capsys.readouterr().err
    record = json.loads((out / "study.json").read_text(encoding="utf-8"))
    [(name, entry)] = record["results"].items()
    result = Result.load(out / entry["file"])
    assert cli.main(["run", str(out), "--check"]) == 0, capsys.readouterr()
    assert "bit for bit" in capsys.readouterr().out
    return shown, text, result, out


def test_vae_sweeps_saved_from_the_page_run_to_the_same_bits(served, tmp_path, capsys):
    from crosspatch.study import load_study

    server, session = served["vae"]
    pair = next(p for p in session.gallery.pairs if p["factor"] == "colour")
    shown, text, result, out = _saved_and_run(
        server, {"image": pair["a"], "toward": pair["b"], "sites": "latent.z[dim=*]"}, tmp_path / "pair", capsys)
    assert 'pair = { factor = "colour", split = "train", seed = 0, n = 1, index = 0 }' in text
    assert 'metric = "closeness"' in text and f'model = "{VAE}"' in text
    assert shown.shape == (4,) and np.abs(shown).max() > 1e-3  # the latents carry some of the way
    np.testing.assert_array_equal(result.values, shown)
    assert result.dims == ("dim",) and result.metadata["normalize"] is True
    assert "closeness to B's reconstruction" in str(result.metadata["metric"])

    # Blocks of the encoder: streamed one layer per step on the page, one call in the study.
    shown, text, result, out = _saved_and_run(
        server, {"image": 1, "toward": 8, "sites": "encoder.block.*"}, tmp_path / "blocks", capsys)
    assert 'image = { split = "train", seed = 0, n = 6, index = 1 }' in text
    assert 'toward = { split = "test", seed = 0, n = 6, index = 2 }' in text
    assert shown.shape == (3,) and np.isfinite(shown).all()
    np.testing.assert_array_equal(result.values, shown)
    study = load_study(out)  # the folder's normalised study names the same images
    assert study.inputs.image == {"split": "train", "seed": 0, "n": 6, "index": 1}


def test_clip_sweep_saved_from_the_page_runs_to_the_same_bits(served, tmp_path, capsys):
    server, session = served["clip"]
    request = {"image": 2, "toward": 5, "sites": "vision.resid_pre.*[pos=*]"}
    shown, text, result, out = _saved_and_run(server, request, tmp_path, capsys)
    captions = [session.gallery.captions[2], session.gallery.captions[5]]
    assert f"captions = {json.dumps(captions)}" in text and 'metric = "caption_logit_diff"' in text
    assert shown.shape == (2, 17) and np.abs(shown).max() > 1e-3
    np.testing.assert_array_equal(result.values, shown)
    # Other captions than the images' own are saved too, and the run measures against them.
    request = {"image": 2, "toward": 5, "sites": "vision.attn_out.*",
               "sweep_captions": ["a red square at the top left", "a blue circle at the bottom right"]}
    shown, text, result, out = _saved_and_run(server, request, tmp_path / "captions", capsys)
    assert json.dumps(request["sweep_captions"]) in text
    np.testing.assert_array_equal(result.values, shown)


def test_image_tables_draw_the_gallery_images():
    from crosspatch.serve.images import shapes_gallery
    from crosspatch.study.images import draw_image

    gallery = shapes_gallery()
    for i in range(len(gallery)):
        image, caption = draw_image(gallery.task, gallery.origin(i))
        assert torch.equal(image, gallery.image(i)) and caption == gallery.captions[i], gallery.origin(i)


def test_a_saved_study_loads_the_model_as_the_server_did(served):
    """The zoo build (model_seed) and a dtype given to serve go into the study file, and its run loads them."""
    import tomllib

    from crosspatch.serve.server import load_session
    from crosspatch.study.spec import parse_study

    session = load_session(VAE, seed=3, dtype=torch.float64)
    study = parse_study(tomllib.loads(session.study({"image": 0, "toward": 1, "sites": "latent.z"}).to_toml()))
    assert (study.model, study.model_seed, study.dtype) == (VAE, 3, "float64")
    assert getattr(torch, study.dtype) is torch.float64 and next(session.m.module.parameters()).dtype is torch.float64
