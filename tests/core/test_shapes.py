"""The procedurally drawn shapes task: determinism, one-factor pairs, what the pixels show, splits."""

from __future__ import annotations

import math

import pytest
import torch

from crosspatch.zoo.tasks.base import TaskError
from crosspatch.zoo.tasks.shapes import COLOURS, SHAPES, ImagePairs, ShapeBatch, ShapesTask

FACTORS = ("shape", "colour", "scale", "x", "y", "rotation")


@pytest.fixture(scope="module")
def task():
    return ShapesTask()


@pytest.fixture(scope="module")
def every(task):
    """Every factor combination once: factor indices and images shaped [*sizes, 3, S, S]."""
    sizes = [task.sizes[f] for f in task.factors]
    grid = torch.cartesian_prod(*[torch.arange(k) for k in sizes])
    factors = {f: grid[:, i] for i, f in enumerate(task.factors)}
    images = task.render(factors)
    return factors, images, images.reshape(*sizes, 3, task.size, task.size)


def coverage(images):
    """Per-pixel coverage: the brightest channel (every colour has a channel at 1)."""
    return images.amax(dim=1)


def centroid(images):
    """(column, row) of the coverage-weighted centre, in pixels."""
    cov = coverage(images)
    idx = torch.arange(cov.shape[-1], dtype=cov.dtype) + 0.5
    mass = cov.sum((-2, -1))
    return (cov.sum(-2) * idx).sum(-1) / mass, (cov.sum(-1) * idx).sum(-1) / mass


# ------------------------------------------------------------------------------------------- basics


def test_task_attributes(task):
    assert task.name == "shapes" and task.modality == "image" and task.description
    assert task.factors == FACTORS
    assert task.values == {
        "shape": ("circle", "square", "triangle", "cross"),
        "colour": ("red", "green", "blue", "yellow", "magenta", "cyan"),
        "scale": ("small", "medium", "large"),
        "x": ("left", "center", "right"),
        "y": ("top", "middle", "bottom"),
        "rotation": (0, 15, 30, 45),
    }
    assert task.sizes == {"shape": 4, "colour": 6, "scale": 3, "x": 3, "y": 3, "rotation": 4}


def test_sample_shapes_ranges_and_black_background(task):
    b = task.sample(64, seed=1)
    assert isinstance(b, ShapeBatch) and len(b) == 64 and b.split == "train"
    assert b.images.shape == (64, 3, 32, 32) and b.images.dtype == torch.float32
    assert b.images.min() >= 0 and b.images.max() <= 1
    assert b.images[:, :, 0, :].abs().max() == 0 and b.images[:, :, :, -1].abs().max() == 0  # borders stay black
    assert set(b.factors) == set(FACTORS)
    for f, t in b.factors.items():
        assert t.dtype == torch.long and t.shape == (64,)
        assert b.values[f] == [task.values[f][i] for i in t.tolist()]
    assert len(b.captions) == 64
    # antialiased: edges have partial coverage
    cov = coverage(b.images)
    assert ((cov > 0.05) & (cov < 0.95)).any()


def test_sample_is_deterministic_by_seed(task):
    a, b, c = task.sample(50, seed=7), task.sample(50, seed=7), task.sample(50, seed=8)
    assert torch.equal(a.images, b.images) and a.captions == b.captions
    assert all(torch.equal(a.factors[f], b.factors[f]) for f in FACTORS)
    assert not torch.equal(a.images, c.images)
    p, q = task.pairs(20, seed=3, factor="x"), task.pairs(20, seed=3, factor="x")
    assert torch.equal(p.clean.images, q.clean.images) and torch.equal(p.corrupt.images, q.corrupt.images)


def test_render_is_batch_independent_and_broadcasts(task, every):
    factors, images, _ = every
    rows = [0, 17, 1234, len(images) - 1]
    for r in rows:
        one = task.render({f: t[r : r + 1] for f, t in factors.items()})
        assert torch.equal(one[0], images[r])
    # 0-d indices broadcast against a 1-d traversal
    trav = task.render({"shape": 1, "colour": 0, "scale": torch.arange(3), "x": 1, "y": 1, "rotation": 0})
    assert trav.shape == (3, 3, 32, 32)
    assert torch.equal(trav, task.render(task.encode(shape="square", colour="red", scale=["small", "medium", "large"])))


def test_large_batches_draw_every_row(task):
    """Rendering works in chunks; no row is left empty (speed is not asserted)."""
    b = task.sample(2000, seed=0)
    assert (coverage(b.images).sum((-2, -1)) > 5).all()


# ------------------------------------------------------------------------------------ pairs


@pytest.mark.parametrize("split", ["train", "test"])
@pytest.mark.parametrize("factor", FACTORS)
def test_pairs_differ_in_exactly_the_named_factor(task, factor, split):
    p = task.pairs(200, seed=5, split=split, factor=factor)
    assert isinstance(p, ImagePairs) and p.factor == factor and len(p) == 200
    for f in FACTORS:
        same = p.clean.factors[f] == p.corrupt.factors[f]
        assert (~same).all() if f == factor else same.all(), f
    # and the images always differ (no invisible change is ever drawn)
    diff = (p.clean.images - p.corrupt.images).abs().flatten(1).sum(1)
    assert (diff > 1.0).all()
    assert task.visible(factor, p.clean.factors).all()
    # both images lie in the pair's split
    assert set(task.split_of(p.clean.factors)) == {split} == set(task.split_of(p.corrupt.factors))


def test_pairs_default_factor_is_colour(task):
    p = task.pairs(10)
    assert p.factor == "colour" and p.clean.split == "test"


def test_rotation_pairs_never_use_circles(task):
    p = task.pairs(500, seed=0, split="train", factor="rotation")
    assert (p.clean.factors["shape"] != task.shapes.index("circle")).all()


def test_every_factor_change_changes_the_image_except_circle_rotation(task, every):
    """Exhaustive over all 2592 combinations and every pair of values of every factor."""
    _, _, grid = every
    for axis, f in enumerate(task.factors):
        k = task.sizes[f]
        for i in range(k):
            for j in range(i + 1, k):
                diff = (grid.select(axis, i) - grid.select(axis, j)).abs().flatten(-3).sum(-1)
                if f == "rotation":
                    circle = task.shapes.index("circle")
                    assert diff[circle].max() == 0  # documented invisible case
                    diff = torch.cat([diff[s].flatten() for s in range(len(task.shapes)) if s != circle])
                assert diff.min() > 1.0, (f, i, j)


def test_visible_marks_circle_rotation_only(task):
    f = task.encode(shape=list(task.shapes))
    assert task.visible("rotation", f).tolist() == [False, True, True, True]
    assert task.visible("colour", f).all()


def test_pair_captions_differ_in_the_factor_word(task):
    for factor, table in [("colour", task.colours), ("shape", task.shapes), ("x", task.x_words), ("y", task.y_words)]:
        p = task.pairs(50, seed=2, split="train", factor=factor)
        for a, b, va, vb in zip(p.clean.captions, p.corrupt.captions, p.clean.values[factor], p.corrupt.values[factor]):
            wa, wb = a.split(), b.split()
            assert len(wa) == len(wb)
            changed = [(x, y) for x, y in zip(wa, wb) if x != y]
            assert changed == [(va, vb)] and va in table
    for factor in ("scale", "rotation"):  # not in the default caption
        p = task.pairs(20, seed=2, split="train", factor=factor)
        assert p.clean.captions == p.corrupt.captions


# --------------------------------------------------------------------------- what the pixels show


def test_drawn_colour_matches_colour_factor(task):
    b = task.sample(300, seed=11)
    for i in range(len(b)):
        img = b.images[i]
        cov = img.amax(0)
        fg = cov > 0.5
        mean = (img[:, fg] / cov[fg]).mean(1)  # undo antialiasing, then average
        rgb = torch.tensor(COLOURS[b.values["colour"][i]])
        assert torch.allclose(mean, rgb, atol=1e-6)
        full = cov == 1
        assert full.any() and torch.equal(img[:, full], rgb[:, None].expand(3, int(full.sum())))


@pytest.mark.parametrize("axis", ["x", "y"])
def test_position_moves_the_centroid(task, axis):
    p = task.pairs(300, seed=4, split="train", factor=axis)
    k = 0 if axis == "x" else 1  # rows grow downwards: top < middle < bottom
    moved = centroid(p.corrupt.images)[k] - centroid(p.clean.images)[k]
    step = (p.corrupt.factors[axis] - p.clean.factors[axis]).float()
    assert (torch.sign(moved) == torch.sign(step)).all()
    # by the grid spacing: 0.45 of the half-side, 7.2 pixels at 32
    assert torch.allclose(moved, step * 0.45 * 16, atol=0.3)
    # the other coordinate stays put, up to sub-pixel sampling
    assert torch.allclose(centroid(p.corrupt.images)[1 - k], centroid(p.clean.images)[1 - k], atol=0.1)


def test_centroid_is_at_the_grid_position(task, every):
    factors, images, _ = every
    cx, cy = centroid(images)
    pos = torch.tensor(task.positions)
    assert torch.allclose(cx, 16 + 16 * pos[factors["x"]], atol=0.3)
    assert torch.allclose(cy, 16 + 16 * pos[factors["y"]], atol=0.3)


def test_scale_grows_the_area_monotonically(task, every):
    _, _, grid = every
    area = grid.amax(dim=-3).sum((-2, -1))  # [shape, colour, scale, x, y, rotation]
    assert (area.diff(dim=2) > 5).all()  # five pixels more per step at least, for every shape, place and angle


@pytest.mark.parametrize(
    "shape, area",
    [
        ("circle", math.pi),
        ("square", 1.7**2),
        ("triangle", 3 * math.sqrt(3) / 4 * 1.2**2),
        ("cross", 2 * 2.1 * 0.72 - 0.72**2),
        ("star", 5 * 1.2**2 * 0.5 * math.sin(math.radians(36))),
    ],
)
def test_rendered_area_matches_the_geometry(shape, area):
    """Coverage integrates the signed distance field: the drawn area is the shape's true area."""
    task = ShapesTask(64, shapes=(shape, "circle" if shape != "circle" else "square"))
    f = task.encode(shape=[shape] * 4, scale="large", rotation=[0, 15, 30, 45])
    drawn = coverage(task.render(f)).sum((-2, -1))
    expected = area * (0.40 * 32) ** 2
    assert torch.allclose(drawn, torch.full_like(drawn, expected), rtol=0.01)


def test_rotation_keeps_the_area(task):
    f = task.encode(shape="triangle", scale="large", rotation=[0, 15, 30, 45])
    area = coverage(task.render(f)).sum((-2, -1))
    assert (area.max() - area.min()) / area.mean() < 0.02


# --------------------------------------------------------------------------------------- captions


def test_captions_name_colour_shape_and_position(task):
    f = task.encode(shape="square", colour="red", x="left", y="top")
    assert task.caption(f) == ["a red square at the top left"]
    b = task.sample(100, seed=9)
    for i, cap in enumerate(b.captions):
        words = cap.split()
        for factor in ("colour", "shape", "x", "y"):
            assert b.values[factor][i] in words
        assert cap == f"a {b.values['colour'][i]} {b.values['shape'][i]} at the {b.values['y'][i]} {b.values['x'][i]}"


def test_caption_template_may_use_scale_and_rotation():
    t = ShapesTask(caption_template="a {scale} {colour} {shape} turned {rotation} degrees")
    f = t.encode(shape="cross", colour="cyan", scale="small", rotation=30)
    assert t.caption(f) == ["a small cyan cross turned 30 degrees"]
    with pytest.raises(TaskError, match="size"):
        ShapesTask(caption_template="a {size} {shape}")


# ------------------------------------------------------------------------------------------ splits


def test_split_holds_out_shape_colour_combinations(task):
    train, test = set(task.combinations("train")), set(task.combinations("test"))
    assert not train & test
    assert len(train | test) == 24 and len(test) == 8
    named = {(task.shapes[s], task.colours[c]) for s, c in test}
    assert named == {
        ("circle", "blue"), ("circle", "magenta"), ("square", "yellow"), ("square", "cyan"),
        ("triangle", "magenta"), ("triangle", "red"), ("cross", "cyan"), ("cross", "green"),
    }
    assert named == set(task.held_out)
    # every shape and every colour is still seen in training
    assert {s for s, _ in train} == set(range(4)) and {c for _, c in train} == set(range(6))


def test_samples_respect_the_split(task):
    tr, te = task.sample(1000, seed=0, split="train"), task.sample(1000, seed=0, split="test")
    combos = lambda b: set(zip(b.values["shape"], b.values["colour"]))  # noqa: E731
    assert combos(tr).isdisjoint(combos(te))
    assert combos(te) == set(task.held_out)
    assert len(combos(tr)) == 16
    assert set(task.split_of(tr.factors)) == {"train"} and set(task.split_of(te.factors)) == {"test"}
    assert set(tr.captions).isdisjoint(te.captions)


def test_custom_held_out_and_star():
    t = ShapesTask(shapes=SHAPES, held_out=[("star", "red"), ("star", "blue"), ("circle", "red")])
    assert {(t.shapes[s], t.colours[c]) for s, c in t.combinations("test")} == set(t.held_out)
    p = t.pairs(40, seed=0, split="test", factor="colour")  # star: red <-> blue
    assert set(p.clean.values["shape"]) == {"star"}
    p = t.pairs(40, seed=0, split="test", factor="shape")  # red: star <-> circle
    assert set(p.clean.values["colour"]) == {"red"}
    with pytest.raises(TaskError, match="no two images"):
        ShapesTask(held_out=[("circle", "red")]).pairs(4, split="test", factor="colour")


# ------------------------------------------------------------------------------------------ errors


def test_unknown_factor_names_it_and_lists_factors(task):
    with pytest.raises(TaskError, match=r"'size'.*shape, colour, scale, x, y, rotation"):
        task.pairs(4, factor="size")
    with pytest.raises(TaskError, match="'hue'"):
        task.render({**task.encode(), "hue": torch.zeros(1, dtype=torch.long)})
    with pytest.raises(TaskError, match="'hue'"):
        task.encode(hue="red")
    with pytest.raises(TaskError, match="'hue'"):
        task.visible("hue", task.encode())


def test_bad_split_names_it_and_lists_splits(task):
    for call in (lambda: task.sample(4, split="val"), lambda: task.pairs(4, split="val")):
        with pytest.raises(TaskError, match=r"'val'.*train, test"):
            call()


def test_bad_factor_values_are_reported(task):
    with pytest.raises(TaskError, match=r"missing factor\(s\) rotation"):
        task.render({f: torch.zeros(2, dtype=torch.long) for f in FACTORS[:-1]})
    with pytest.raises(TaskError, match=r"'colour' has indices outside 0..5"):
        task.render({**task.encode(), "colour": torch.tensor([6])})
    with pytest.raises(TaskError, match="different lengths"):
        task.render({**task.encode(), "x": torch.tensor([0, 1]), "y": torch.tensor([0, 1, 2])})
    with pytest.raises(TaskError, match="integer"):
        task.render({**task.encode(), "x": torch.tensor([0.5])})
    with pytest.raises(TaskError, match="purple.*values: red"):
        task.encode(colour="purple")
    with pytest.raises(TaskError, match="hexagon"):
        ShapesTask(shapes=("circle", "hexagon"))
    with pytest.raises(TaskError, match="n must be"):
        task.sample(-1)


# ------------------------------------------------------------------------------------ batch helpers


def test_batch_indexing_and_empty(task):
    b = task.sample(10, seed=0)
    sub = b[2:5]
    assert len(sub) == 3 and sub.captions == b.captions[2:5] and torch.equal(sub.images, b.images[2:5])
    assert b[-1].captions == [b.captions[-1]] and b[3].values["shape"] == [b.values["shape"][3]]
    mask = b.factors["x"] == 0
    assert len(b[mask]) == int(mask.sum())
    assert len(task.sample(0)) == 0 and task.sample(0).images.shape == (0, 3, 32, 32)


def test_hand_built_batch_matches_sample(task):
    s = task.sample(16, seed=2)
    b = task.batch(s.factors)
    assert torch.equal(b.images, s.images) and b.captions == s.captions and b.values == s.values


def test_custom_colours_by_rgb():
    t = ShapesTask(16, colours={"grey": (0.5, 0.5, 0.5), "teal": (0.0, 0.5, 0.5)})
    assert t.colours == ("grey", "teal") and t.size == 16
    img = t.render(t.encode(colour="teal", scale="large"))[0]
    assert img.amax((1, 2)).tolist() == [0.0, 0.5, 0.5]
    with pytest.raises(TaskError, match="same RGB"):
        ShapesTask(colours={"a": (1, 0, 0), "b": (1, 0, 0)})
