"""Procedurally drawn shapes with known generative factors.

One coloured shape on a black background, drawn from six factors, each an index into a small
value set::

    shape     circle, square, triangle, cross            (star is available: ShapesTask(shapes=...))
    colour    red, green, blue, yellow, magenta, cyan    (pure RGB primaries and secondaries)
    scale     small, medium, large                       (0.24, 0.32, 0.40 of the half-side, see below)
    x         left, center, right                        (centre at -0.45, 0, 0.45 of the half-side)
    y         top, middle, bottom
    rotation  0, 15, 30, 45 degrees, counter-clockwise on screen

Rendering is pure torch and deterministic: each shape is a signed distance field evaluated at the
pixel centres, and a pixel's coverage is ``clamp(0.5 - distance_in_pixels, 0, 1)`` (a one-pixel
antialiasing ramp). A shape of scale ``s`` is a circle of radius ``s`` (in units of half the image
side) or a square, triangle, cross or star that reaches ``1.2 s`` from its centre, so even a large
shape at the edge of the grid stays inside the image. An image is ``coverage * rgb``: floats in
[0, 1], shape ``[n, 3, size, size]``. 10k images of 32x32 take about 0.3 s on one CPU core.

**Invisible factor values.** A circle looks the same at every rotation, so for circles the
rotation factor does not change the image (circles are drawn unrotated, so the pixels are
identical). :meth:`ShapesTask.sample` still draws it (the factors stay independent),
:meth:`ShapesTask.visible` tells which rows it matters for, and :meth:`ShapesTask.pairs` never
draws a rotation pair on a circle. No other factor change leaves the image unchanged: the four
rotations are distinct modulo every other shape's symmetry (square and cross 90 degrees,
triangle 120, star 72).

**Splits.** Some (shape, colour) *combinations* are held out: the ``"test"`` split draws only those,
``"train"`` only the others, so a model trained on ``"train"`` has seen every shape and every colour,
but never these pairs together, and zero-shot accuracy on them is measurable. The default rule holds
out, for shape number ``s``, colours number ``(s + 2) % C`` and ``(s + 4) % C`` (``C`` colours; with
fewer than five colours only ``(s + 1) % C``): with
the default value sets that is blue and magenta circles, yellow and cyan squares, magenta and red
triangles, cyan and green crosses (8 of 24 combinations). Pass ``held_out=`` to choose others. Both
images of a pair belong to the pair's split, so test colour pairs swap between a shape's two
held-out colours and test shape pairs only exist for colours held out with two shapes.

Captions follow ``caption_template`` (default ``"a {colour} {shape} at the {y} {x}"``, e.g.
``"a red square at the top left"``); every caption of a task has the same words in the same places,
so the captions of a colour pair differ in exactly the colour word. Scale and rotation are not in
the default caption; the template may use ``{scale}`` (small / medium / large) and ``{rotation}``
(degrees).
"""

from __future__ import annotations

import math
import string
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import torch

from .base import SPLITS, Split, TaskError, check_split

__all__ = ["ShapesTask", "ShapeBatch", "ImagePairs", "SHAPES", "COLOURS"]

#: Every shape the renderer knows. Each fits in a circle of radius 1.2 (in units of the scale).
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "star")

#: Every named colour and its RGB value.
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "magenta": (1.0, 0.0, 1.0),
    "cyan": (0.0, 1.0, 1.0),
    "white": (1.0, 1.0, 1.0),
    "orange": (1.0, 0.5, 0.0),
    "purple": (0.5, 0.0, 1.0),
}

#: Rotational symmetry of each shape in degrees (0: any rotation leaves it unchanged).
SYMMETRY: dict[str, float] = {"circle": 0.0, "square": 90.0, "triangle": 120.0, "cross": 90.0, "star": 72.0}

_DEFAULT_SHAPES = ("circle", "square", "triangle", "cross")
_DEFAULT_COLOURS = ("red", "green", "blue", "yellow", "magenta", "cyan")
_CHUNK = 2048  # images rendered per vectorised step; bounds memory at large n


# --------------------------------------------------------------------------------------------------
# batches


@dataclass
class ShapeBatch:
    """Images with the factor indices that drew them.

    ``factors[f][i]`` indexes ``task.values[f]``; ``values[f][i]`` is the human-readable value
    (a name for shape, colour, scale, x and y; degrees for rotation).
    """

    images: torch.Tensor  # [n, 3, size, size], float in [0, 1]
    factors: dict[str, torch.Tensor]  # factor -> [n] long
    values: dict[str, list]  # factor -> n readable values
    captions: list[str]
    split: str | None = None  # "train" / "test" when drawn by the task, None when hand-built

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index) -> "ShapeBatch":
        """Rows by int, slice, index list or mask; always returns a batch."""
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        if isinstance(index, slice):
            rows = list(range(len(self)))[index]
        else:
            rows = torch.arange(len(self))[torch.as_tensor(index).cpu()].reshape(-1).tolist()
        rows_t = torch.tensor(rows, dtype=torch.long, device=self.images.device)
        return ShapeBatch(
            images=self.images[rows_t],
            factors={f: t[rows_t.to(t.device)] for f, t in self.factors.items()},
            values={f: [v[i] for i in rows] for f, v in self.values.items()},
            captions=[self.captions[i] for i in rows],
            split=self.split,
        )

    def to(self, device) -> "ShapeBatch":
        """The same batch with images and factor tensors on ``device``."""
        return ShapeBatch(
            images=self.images.to(device),
            factors={f: t.to(device) for f, t in self.factors.items()},
            values=self.values,
            captions=self.captions,
            split=self.split,
        )


@dataclass
class ImagePairs:
    """Clean and corrupt images that differ in exactly one factor, ``factor``, row by row.

    The captions come with the batches: ``clean.captions[i]`` and ``corrupt.captions[i]`` differ in
    the word for ``factor`` when the caption template mentions it, and are equal otherwise.
    """

    clean: ShapeBatch
    corrupt: ShapeBatch
    factor: str
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    def __len__(self) -> int:
        return len(self.clean)

    def to(self, device) -> "ImagePairs":
        return ImagePairs(self.clean.to(device), self.corrupt.to(device), self.factor, dict(self.meta))


# --------------------------------------------------------------------------------------------------
# signed distance fields, in the shape's own frame (y up, unit scale); negative inside


def _box(x: torch.Tensor, y: torch.Tensor, bx: float, by: float) -> torch.Tensor:
    dx = x.abs() - bx
    dy = y.abs() - by
    outside = torch.sqrt(dx.clamp(min=0) ** 2 + dy.clamp(min=0) ** 2)
    return outside + torch.maximum(dx, dy).clamp(max=0)


def _sd_circle(x, y):
    return torch.sqrt(x * x + y * y) - 1.0


def _sd_square(x, y):
    return _box(x, y, 0.85, 0.85)  # circumradius 1.2


def _sd_cross(x, y):
    return torch.minimum(_box(x, y, 1.05, 0.36), _box(x, y, 0.36, 1.05))


_TRI_HALF_SIDE = 1.2 * math.sqrt(3) / 2  # circumradius 1.2, apex up, centroid at the origin


def _sd_triangle(x, y):
    # Inigo Quilez's exact equilateral-triangle distance.
    k = math.sqrt(3.0)
    r = _TRI_HALF_SIDE
    px = x.abs() - r
    py = y + r / k
    fold = (px + k * py) > 0
    px, py = torch.where(fold, (px - k * py) / 2, px), torch.where(fold, (-k * px - py) / 2, py)
    px = px - px.clamp(-2 * r, 0.0)
    return -torch.sqrt(px * px + py * py) * torch.sign(py)


_STAR_R, _STAR_INNER = 1.2, 0.5  # outer radius, inner radius as a fraction of it


def _sd_star(x, y):
    # Inigo Quilez's exact five-pointed star distance (a point up).
    k1x, k1y = 0.809016994375, -0.587785252292
    k2x, k2y = -k1x, k1y
    px, py = x.abs(), y
    d = (k1x * px + k1y * py).clamp(min=0)
    px, py = px - 2 * d * k1x, py - 2 * d * k1y
    d = (k2x * px + k2y * py).clamp(min=0)
    px, py = px - 2 * d * k2x, py - 2 * d * k2y
    px = px.abs()
    py = py - _STAR_R
    bax, bay = _STAR_INNER * -k1y, _STAR_INNER * k1x - 1.0
    h = ((px * bax + py * bay) / (bax * bax + bay * bay)).clamp(0.0, _STAR_R)
    ex, ey = px - bax * h, py - bay * h
    return torch.sqrt(ex * ex + ey * ey) * torch.sign(py * bax - px * bay)


_SDF = {"circle": _sd_circle, "square": _sd_square, "triangle": _sd_triangle, "cross": _sd_cross, "star": _sd_star}


# --------------------------------------------------------------------------------------------------
# the task


class ShapesTask:
    """One coloured shape on black, from six factors; image pairs that differ in exactly one.

    ``size`` is the image side in pixels. ``shapes`` and ``colours`` choose value sets from
    :data:`SHAPES` and :data:`COLOURS` (``colours`` may also map new names to RGB triples).
    ``held_out`` lists the (shape, colour) combinations of the test split (default: see the module
    docstring). ``caption_template`` uses the fields ``{shape} {colour} {scale} {x} {y} {rotation}``.
    """

    name = "shapes"
    description = (
        "One coloured shape on black drawn from six factors (shape, colour, scale, x, y, rotation); "
        "image pairs that differ in exactly one factor, with captions. The test split holds "
        "(shape, colour) combinations never drawn in train."
    )
    modality = "image"
    factors: tuple[str, ...] = ("shape", "colour", "scale", "x", "y", "rotation")
    default_factor = "colour"

    scales: tuple[float, ...] = (0.24, 0.32, 0.40)  # circle radius, as a fraction of the half-side
    scale_words: tuple[str, ...] = ("small", "medium", "large")
    positions: tuple[float, ...] = (-0.45, 0.0, 0.45)  # centre, as a fraction of the half-side
    x_words: tuple[str, ...] = ("left", "center", "right")
    y_words: tuple[str, ...] = ("top", "middle", "bottom")
    rotations: tuple[int, ...] = (0, 15, 30, 45)  # degrees, counter-clockwise on screen

    def __init__(
        self,
        size: int = 32,
        *,
        shapes: Sequence[str] | None = None,
        colours: Sequence[str] | Mapping[str, Sequence[float]] | None = None,
        held_out: Iterable[tuple[str, str]] | None = None,
        caption_template: str = "a {colour} {shape} at the {y} {x}",
    ) -> None:
        if not isinstance(size, int) or size < 8:
            raise TaskError(f"size must be an int of at least 8 pixels, got {size!r}")
        self.size = size

        shapes = tuple(_DEFAULT_SHAPES if shapes is None else shapes)
        unknown = [s for s in shapes if s not in _SDF]
        if unknown or len(set(shapes)) != len(shapes) or len(shapes) < 2:
            raise TaskError(
                f"shapes must be at least two distinct names from {', '.join(SHAPES)}; got {list(shapes)}"
            )
        self.shapes = shapes

        if colours is None:
            colours = _DEFAULT_COLOURS
        if isinstance(colours, Mapping):
            rgb = {str(k): tuple(float(c) for c in v) for k, v in colours.items()}
        else:
            missing = [c for c in colours if c not in COLOURS]
            if missing:
                raise TaskError(
                    f"unknown colour(s) {missing}; known: {', '.join(COLOURS)} (or pass a mapping name -> RGB)"
                )
            rgb = {c: COLOURS[c] for c in colours}
        if len(rgb) < 2 or any(len(v) != 3 or not all(0.0 <= c <= 1.0 for c in v) for v in rgb.values()):
            raise TaskError(f"colours must be at least two names with RGB values in [0, 1]; got {rgb}")
        if len(set(rgb.values())) != len(rgb):
            raise TaskError("two colours have the same RGB value; a colour change would not change the image")
        self.colours = tuple(rgb)
        self.rgb = rgb

        self.held_out = self._held_out(held_out)

        fields = {f for _, f, _, _ in string.Formatter().parse(caption_template) if f is not None}
        if fields - set(self.factors):
            raise TaskError(
                f"caption_template uses {sorted(fields - set(self.factors))}; fields are {', '.join(self.factors)}"
            )
        self.caption_template = caption_template

        # tables indexed by factor value; cos/sin come from math so every batch uses identical numbers
        self._rgb_table = torch.tensor([rgb[c] for c in self.colours], dtype=torch.float32)
        self._scale_table = torch.tensor(self.scales, dtype=torch.float32)
        self._pos_table = torch.tensor(self.positions, dtype=torch.float32)
        self._cos_table = torch.tensor([math.cos(math.radians(a)) for a in self.rotations], dtype=torch.float32)
        self._sin_table = torch.tensor([math.sin(math.radians(a)) for a in self.rotations], dtype=torch.float32)
        self._spins = torch.tensor([SYMMETRY[s] > 0 for s in self.shapes])
        self._grid = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2 - 1  # pixel centres in [-1, 1]

    # ---------------------------------------------------------------------------- value sets

    @property
    def values(self) -> dict[str, tuple]:
        """Readable value set of each factor; a factor index points into it."""
        return {
            "shape": self.shapes,
            "colour": self.colours,
            "scale": self.scale_words,
            "x": self.x_words,
            "y": self.y_words,
            "rotation": self.rotations,
        }

    @property
    def sizes(self) -> dict[str, int]:
        """Number of values of each factor."""
        return {f: len(v) for f, v in self.values.items()}

    def __repr__(self) -> str:
        return f"ShapesTask(size={self.size}, shapes={self.shapes}, colours={self.colours})"

    def _held_out(self, held_out) -> tuple[tuple[str, str], ...]:
        if held_out is None:
            ncol = len(self.colours)
            offsets = (2, 4) if ncol >= 5 else (1,)
            pairs = [(s, self.colours[(i + o) % ncol]) for i, s in enumerate(self.shapes) for o in offsets]
        else:
            pairs = [tuple(p) for p in held_out]
            for p in pairs:
                if len(p) != 2 or p[0] not in self.shapes or p[1] not in self.colours:
                    raise TaskError(
                        f"held_out entry {p!r} is not a (shape, colour) pair of this task; shapes: "
                        f"{', '.join(self.shapes)}; colours: {', '.join(self.colours)}"
                    )
        pairs = tuple(dict.fromkeys(pairs))
        if not pairs or len(pairs) == len(self.shapes) * len(self.colours):
            raise TaskError("held_out must leave at least one (shape, colour) combination for each split")
        return pairs

    def combinations(self, split: Split) -> list[tuple[int, int]]:
        """The (shape index, colour index) combinations a split draws."""
        check_split(split, self.name)
        held = {(self.shapes.index(s), self.colours.index(c)) for s, c in self.held_out}
        every = [(s, c) for s in range(len(self.shapes)) for c in range(len(self.colours))]
        return [sc for sc in every if (sc in held) == (split == "test")]

    def split_of(self, factors: Mapping[str, Any]) -> list[str]:
        """``"train"`` or ``"test"`` for each row, from its (shape, colour) combination."""
        f = self._factor_tensors(factors, need=("shape", "colour"))
        held = {(self.shapes.index(s), self.colours.index(c)) for s, c in self.held_out}
        return ["test" if sc in held else "train" for sc in zip(f["shape"].tolist(), f["colour"].tolist())]

    def visible(self, factor: str, factors: Mapping[str, Any]) -> torch.Tensor:
        """Bool per row: would changing ``factor`` change this row's image? False only for the
        rotation of shapes that look the same at every rotation (circles)."""
        self._check_factor(factor)
        f = self._factor_tensors(factors, need=("shape",))
        if factor != "rotation":
            return torch.ones_like(f["shape"], dtype=torch.bool)
        return self._spins.to(f["shape"].device)[f["shape"]]

    def encode(self, **values: Any) -> dict[str, torch.Tensor]:
        """Factor indices from readable values, e.g. ``encode(shape=["square", "circle"], colour="red")``.

        Each value is one readable value or a list of them (lists must have equal lengths, single
        values broadcast). Factors left out take a neutral value: the first shape and colour, medium
        scale, center, middle, rotation 0.
        """
        defaults = {"shape": 0, "colour": 0, "scale": len(self.scales) // 2, "x": 1, "y": 1, "rotation": 0}
        out: dict[str, Any] = {}
        for f, v in values.items():
            self._check_factor(f)
            table = self.values[f]
            many = isinstance(v, (list, tuple))
            items = list(v) if many else [v]
            idx = []
            for item in items:
                if item not in table:
                    raise TaskError(f"{f} has no value {item!r}; values: {', '.join(map(str, table))}")
                idx.append(table.index(item))
            out[f] = torch.tensor(idx, dtype=torch.long) if many else torch.tensor(idx[0], dtype=torch.long)
        for f in self.factors:
            out.setdefault(f, torch.tensor(defaults[f], dtype=torch.long))
        return self._factor_tensors(out)

    # ---------------------------------------------------------------------------- checks

    def _check_factor(self, factor: str) -> None:
        if factor not in self.factors:
            raise TaskError(f"unknown factor {factor!r} for task 'shapes'; factors: {', '.join(self.factors)}")

    def _factor_tensors(self, factors: Mapping[str, Any], need: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """Validated 1-d long tensors of equal length (0-d and length-1 values broadcast)."""
        if not isinstance(factors, Mapping):
            raise TaskError(f"factors must be a mapping factor -> indices, got {type(factors).__name__}")
        for f in factors:
            self._check_factor(f)
        need = self.factors if need is None else need
        missing = [f for f in need if f not in factors]
        if missing:
            raise TaskError(f"missing factor(s) {', '.join(missing)}; the task needs {', '.join(need)}")
        out = {}
        for f in need:
            t = torch.as_tensor(factors[f])
            if t.is_floating_point() or t.dtype == torch.bool or t.dim() > 1:
                raise TaskError(
                    f"factor {f!r} must be integer indices, 0-d or 1-d; got {t.dtype} of shape {tuple(t.shape)}"
                )
            out[f] = t.long().reshape(-1)
        try:
            tensors = torch.broadcast_tensors(*out.values())
        except RuntimeError:
            raise TaskError(
                "factor index tensors have different lengths: "
                + ", ".join(f"{f}={t.numel()}" for f, t in out.items())
            ) from None
        out = dict(zip(out, tensors))
        for f, t in out.items():
            k = len(self.values[f])
            if t.numel() and (int(t.min()) < 0 or int(t.max()) >= k):
                raise TaskError(f"factor {f!r} has indices outside 0..{k - 1} ({', '.join(map(str, self.values[f]))})")
        return out

    # ---------------------------------------------------------------------------- drawing

    def render(self, factors: Mapping[str, Any], *, device: torch.device | str | None = None) -> torch.Tensor:
        """Draw any factor combination: ``[n, 3, size, size]`` floats in [0, 1], black background.

        ``factors`` maps every factor to indices (1-d long tensors of one length; 0-d values
        broadcast, handy for traversals). Deterministic: the same indices give the same pixels, also
        in a different batch. ``device`` defaults to the device of the indices.
        """
        f = self._factor_tensors(factors)
        n = f["shape"].numel()
        device = torch.device(device) if device is not None else f["shape"].device
        f = {k: t.to(device) for k, t in f.items()}
        out = torch.empty(n, 3, self.size, self.size, device=device)
        rgb = self._rgb_table.to(device)
        for start in range(0, n, _CHUNK):
            part = {k: t[start : start + _CHUNK] for k, t in f.items()}
            cov = self._coverage(part, device)
            out[start : start + _CHUNK] = cov[:, None] * rgb[part["colour"]][:, :, None, None]
        return out

    def _coverage(self, f: dict[str, torch.Tensor], device) -> torch.Tensor:
        grid = self._grid.to(device)
        scale = self._scale_table.to(device)[f["scale"]][:, None, None]
        cx = self._pos_table.to(device)[f["x"]][:, None, None]
        cy = self._pos_table.to(device)[f["y"]][:, None, None]
        # shapes that look the same at every angle are drawn unrotated, so their pixels match exactly
        rotation = torch.where(self._spins.to(device)[f["shape"]], f["rotation"], 0)
        cos = self._cos_table.to(device)[rotation][:, None, None]
        sin = self._sin_table.to(device)[rotation][:, None, None]
        dx = grid[None, None, :] - cx  # [m, 1, S]
        dy = cy - grid[None, :, None]  # [m, S, 1], y up
        # into the shape's frame: rotate by -angle, divide by the scale
        qx = (cos * dx + sin * dy) / scale
        qy = (cos * dy - sin * dx) / scale
        sd = torch.empty(qx.shape, device=device)
        for k, shape in enumerate(self.shapes):
            rows = (f["shape"] == k).nonzero().squeeze(1)
            if rows.numel():
                sd[rows] = _SDF[shape](qx[rows], qy[rows])
        pixels = sd * scale * (self.size / 2)
        return (0.5 - pixels).clamp(0.0, 1.0)

    def caption(self, factors: Mapping[str, Any]) -> list[str]:
        """One caption per row from ``caption_template`` (default ``"a red square at the top left"``)."""
        f = self._factor_tensors(factors)
        cols = {k: t.tolist() for k, t in f.items()}
        vals = self.values
        return [
            self.caption_template.format(**{k: vals[k][cols[k][i]] for k in self.factors})
            for i in range(len(cols["shape"]))
        ]

    def batch(self, factors: Mapping[str, Any], *, split: str | None = None, device=None) -> ShapeBatch:
        """A :class:`ShapeBatch` for hand-chosen factor indices (images, readable values, captions)."""
        f = self._factor_tensors(factors)
        if device is not None:
            f = {k: t.to(device) for k, t in f.items()}
        cols = {k: t.tolist() for k, t in f.items()}
        values = {k: [self.values[k][i] for i in col] for k, col in cols.items()}
        return ShapeBatch(
            images=self.render(f),
            factors=f,
            values=values,
            captions=self.caption(f),
            split=split,
        )

    # ---------------------------------------------------------------------------- sampling

    def _generator(self, seed: int, split: str, purpose: int) -> torch.Generator:
        if not isinstance(seed, int):
            raise TaskError(f"seed must be an int, got {seed!r}")
        mixed = (seed * 0x9E3779B97F4A7C15 + SPLITS.index(split) * 0xBF58476D1CE4E5B9 + purpose) % (2**63)
        return torch.Generator().manual_seed(mixed)

    @staticmethod
    def _check_n(n: int) -> None:
        if not isinstance(n, int) or n < 0:
            raise TaskError(f"n must be a non-negative int, got {n!r}")

    def _draw(self, n: int, combos: list[tuple[int, int]], gen: torch.Generator) -> dict[str, torch.Tensor]:
        table = torch.tensor(combos, dtype=torch.long).reshape(-1, 2)
        pick = torch.randint(len(combos), (n,), generator=gen)
        out = {"shape": table[pick, 0], "colour": table[pick, 1]}
        for f in ("scale", "x", "y", "rotation"):
            out[f] = torch.randint(len(self.values[f]), (n,), generator=gen)
        return out

    def sample(self, n: int, *, seed: int = 0, split: Split = "train", device=None) -> ShapeBatch:
        """``n`` images from ``split``: a (shape, colour) combination uniform over the split's
        combinations, the other factors uniform and independent. Reproducible from ``seed``."""
        self._check_n(n)
        check_split(split, self.name)
        gen = self._generator(seed, split, purpose=1)
        return self.batch(self._draw(n, self.combinations(split), gen), split=split, device=device)

    def pairs(
        self, n: int, *, seed: int = 0, split: Split = "test", factor: str | None = None, device=None
    ) -> ImagePairs:
        """``n`` pairs that differ in exactly ``factor`` (default ``"colour"``), both images in ``split``.

        The clean row is drawn as in :meth:`sample` among rows for which another value of ``factor``
        stays in the split and changes the image (no rotation pairs on circles); the corrupt value
        is uniform over those other values.
        """
        self._check_n(n)
        check_split(split, self.name)
        factor = self.default_factor if factor is None else factor
        self._check_factor(factor)
        gen = self._generator(seed, split, purpose=2 + self.factors.index(factor))
        combos = self.combinations(split)

        if factor in ("shape", "colour"):
            axis = 0 if factor == "shape" else 1
            allowed = set(combos)
            alternatives = {}
            for sc in combos:
                alts = []
                for v in range(len(self.values[factor])):
                    other = (v, sc[1]) if axis == 0 else (sc[0], v)
                    if v != sc[axis] and other in allowed:
                        alts.append(v)
                if alts:
                    alternatives[sc] = alts
            valid = list(alternatives)
        elif factor == "rotation":
            valid = [sc for sc in combos if SYMMETRY[self.shapes[sc[0]]] > 0]
        else:
            valid = combos
        if not valid:
            raise TaskError(
                f"split {split!r} has no two images that differ only in {factor!r} "
                f"(held-out combinations: {self.held_out})"
            )

        clean = self._draw(n, valid, gen)
        corrupt = dict(clean)
        if factor in ("shape", "colour"):
            width = max(len(a) for a in alternatives.values())
            padded = torch.zeros(len(self.shapes), len(self.colours), width, dtype=torch.long)
            count = torch.ones(len(self.shapes), len(self.colours), dtype=torch.long)
            for (s, c), alts in alternatives.items():
                padded[s, c, : len(alts)] = torch.tensor(alts)
                count[s, c] = len(alts)
            s, c = clean["shape"], clean["colour"]
            k = torch.minimum((torch.rand(n, generator=gen) * count[s, c]).long(), count[s, c] - 1)
            corrupt[factor] = padded[s, c, k]
        else:
            size = len(self.values[factor])
            step = 1 + torch.randint(size - 1, (n,), generator=gen)
            corrupt[factor] = (clean[factor] + step) % size
        return ImagePairs(
            clean=self.batch(clean, split=split, device=device),
            corrupt=self.batch(corrupt, split=split, device=device),
            factor=factor,
            meta={"task": self.name, "seed": seed, "split": split, "size": self.size},
        )
