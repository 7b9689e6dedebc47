"""The shapes-clip zoo model: a few-step build round-trips through the cache and loads with open_clip alone."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import crosspatch as cp
from crosspatch import zoo
from crosspatch.adapters.open_clip import zoo as clip_zoo
from crosspatch.methods import cross_modal
from crosspatch.tasks.shapes import ShapesTask


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(zoo.CACHE_ENV_VAR, str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_registered_through_the_open_clip_plugin():
    from crosspatch.plugins import get_registry

    spec = zoo.models()["shapes-clip"]
    assert spec.adapter == "open_clip" and spec.task == "shapes" and spec.trains
    info = next(p for p in get_registry().plugins() if p.name == "open_clip")
    assert "shapes-clip" in info.registered["models"] and "open_clip" in info.registered["adapters"]


def test_captions_cover_every_combination():
    task = ShapesTask()
    captions = clip_zoo.CaptionSet(task)
    full = captions.full_captions
    assert len(full) == 216 and len(set(full)) == 216 and full[0] == "a red circle at the top left"
    batch = task.sample(20, seed=0, split="test")
    assert [full[i] for i in captions.full_index(batch.factors).tolist()] == batch.captions
    square = captions.index(5, {"shape": torch.tensor([1]), "colour": torch.tensor([3]), "y": torch.tensor([0]),
                                "x": torch.tensor([2])})
    assert captions.texts[int(square)] == "a square"


def test_a_short_build_round_trips_through_the_cache(cache, monkeypatch):
    import open_clip

    # a smaller batch and data pool keep the test fast; the build runs as zoo.load runs it
    monkeypatch.setattr(clip_zoo, "RECIPE", clip_zoo.Recipe(batch_size=16, pool_images=64, eval_images=32))
    loaded = zoo.load("shapes-clip", steps=2, progress=False)
    folder = zoo.model_dir("shapes-clip", steps=2)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert {clip_zoo.CONFIG_FILE, clip_zoo.WEIGHTS_FILE} <= set(manifest["files"])
    for key in ("accuracy", "caption_accuracy", "colour_accuracy", "shape_accuracy", "position_accuracy",
                "train_seconds", "steps"):
        assert key in loaded.info
    assert loaded.info["steps"] == 2 and loaded.info["candidates"] == 216
    assert loaded.info["accuracy"] == loaded.info["colour_accuracy"]
    assert isinstance(loaded.model, open_clip.CLIP) and not loaded.model.training
    # the patch embedding is the designed, frozen one: 16 colour filters see one channel each
    colour = loaded.model.visual.conv1.weight[:16]
    assert all(int((f.abs().sum(dim=(1, 2)) > 0).sum()) == 1 for f in colour)

    # a plain open_clip local-dir model: open_clip alone loads it, with the bundled tokenizer
    again = open_clip.create_model(f"local-dir:{folder}").eval()
    for (name, a), b in zip(loaded.model.state_dict().items(), again.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    ids = tokenizer(["a red square at the top left"])
    assert ids.shape == (1, 12) and int(ids[0, 0]) == tokenizer.sot_token_id
    torch.testing.assert_close(ids, loaded.tokenizer(["a red square at the top left"]))

    # reloading uses the cache: nothing is built again
    monkeypatch.setattr(clip_zoo, "train", lambda *a, **k: pytest.fail("built twice"))
    cached = zoo.load("shapes-clip", steps=2, dtype=torch.float64)
    assert cached.info["manifest"]["created"] == loaded.info["manifest"]["created"]
    assert next(cached.model.parameters()).dtype == torch.float64

    # and it serves a study through the adapter
    task = ShapesTask()
    pairs = task.pairs(2, seed=0, split="test", factor="colour")
    res = cross_modal.image_pair_patching(
        cp.wrap(cached.model), pairs.clean.images, pairs.corrupt.images, tokenizer(pairs.clean.captions),
        tokenizer(pairs.corrupt.captions), "vision.resid_pre.*", progress=False,
    )
    assert res.values.shape == (3,) and np.isfinite(res.values).all()
