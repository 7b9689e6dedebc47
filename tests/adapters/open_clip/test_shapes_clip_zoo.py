"""The shapes-clip zoo model: a few-step build round-trips through the cache and loads with open_clip alone;
the full recipe names held-out (shape, colour) combinations zero-shot among all 216 captions."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import crosspatch as cp
from crosspatch.zoo import store as zoo
from crosspatch.adapters.open_clip import zoo as clip_zoo
from crosspatch.methods import cross_modal
from crosspatch.zoo.tasks.shapes import ShapesTask


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(zoo.CACHE_ENV_VAR, str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_registered_through_the_open_clip_plugin():
    from crosspatch.plugins.registry import get_registry

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


def test_training_never_draws_a_held_out_combination():
    task = ShapesTask()
    data = clip_zoo.training_task()
    assert data.colours[:6] == task.colours and set(clip_zoo.RECIPE.extra_colours) <= set(data.colours)
    assert data.held_out == task.held_out
    named = {(task.shapes[s], data.colours[c]) for s, c in data.combinations("train")}
    assert not named & set(task.held_out)
    # every extra colour comes with every shape
    assert {(s, c) for s in task.shapes for c in clip_zoo.RECIPE.extra_colours} <= named


def test_minimal_pairs_change_one_attribute_within_the_training_split():
    data = clip_zoo.training_task()
    allowed = clip_zoo.combination_mask(data, "train")
    assert int(allowed.sum()) == len(data.combinations("train")) and not allowed[0, data.colours.index("blue")]
    anchors = data.sample(200, seed=3, split="train").factors
    rows = clip_zoo.minimal_pairs(anchors, allowed, 4, torch.Generator().manual_seed(0))
    assert all(len(v) == 800 for v in rows.values())
    assert allowed[rows["shape"], rows["colour"]].all()  # no held-out combination, ever
    for block, changed in ((1, "shape"), (2, "colour"), (3, "shape")):
        part = {k: v[200 * block:200 * (block + 1)] for k, v in rows.items()}
        for k in anchors:
            same = part[k] == anchors[k]
            assert (~same).all() if k == changed else same.all(), (block, k)


def test_full_build_names_held_out_combinations_among_all_captions(cache):
    """The real recipe (1000 steps, about 2 min on one free core): shape, colour and position of combinations
    never seen in training, chosen among the captions of all 216 combinations."""
    loaded = zoo.load("shapes-clip", progress=False)
    info = loaded.info
    assert info["caption_accuracy"] >= 0.9, info
    assert info["colour_accuracy"] >= 0.95 and info["position_accuracy"] >= 0.95, info
    assert info["train_caption_accuracy"] >= 0.95, info
    assert info["steps"] == clip_zoo.RECIPE.steps and info["seed"] == 0

    # check independently, on fresh held-out images: the nearest of all 216 captions is the image's own
    task = ShapesTask()
    batch = task.sample(500, seed=12345, split="test")
    candidates = clip_zoo.CaptionSet(task).full_captions
    model, tokenizer = loaded.model, loaded.tokenizer
    with torch.no_grad():
        image = torch.nn.functional.normalize(model.encode_image(batch.images), dim=-1)
        text = torch.nn.functional.normalize(model.encode_text(tokenizer(candidates)), dim=-1)
    chosen = [candidates[i] for i in (image @ text.T).argmax(dim=1).tolist()]
    assert np.mean([a == b for a, b in zip(chosen, batch.captions)]) >= 0.9
