"""Images for the page: PNG data URLs written with the standard library, and the shapes gallery the
image panels pick from.

A PNG here is 8-bit RGB, one unfiltered scanline per row, zlib-compressed: what a 32x32 shapes
image needs, with no imaging library. The page scales it up with ``image-rendering: pixelated``,
so every pixel the model produced stays visible as it is.
"""

from __future__ import annotations

import base64
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["Gallery", "png_bytes", "png_data_url", "to_uint8", "shapes_gallery"]


def to_uint8(image: torch.Tensor) -> torch.Tensor:
    """``[3, H, W]`` (or ``[1, H, W]``) floats in [0, 1] -> ``[H, W, 3]`` uint8 (clamped, rounded)."""
    image = image.detach().to("cpu", torch.float64)
    if image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"an image is [3, H, W] or [1, H, W]; got shape {tuple(image.shape)}")
    if image.shape[0] == 1:
        image = image.expand(3, -1, -1)
    return (image.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).permute(1, 2, 0).contiguous()


def png_bytes(image: torch.Tensor) -> bytes:
    """The image (see :func:`to_uint8`) as PNG file bytes."""
    pixels = to_uint8(image)
    height, width = pixels.shape[:2]
    raw = b"".join(b"\x00" + bytes(row.flatten().tolist()) for row in pixels)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8 bits, RGB, no interlace
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def png_data_url(image: torch.Tensor) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode("ascii")


@dataclass
class Gallery:
    """Images the page offers by index, with their captions and the factors that drew them."""

    images: torch.Tensor  # [n, 3, H, W] in [0, 1]
    captions: list[str]
    factors: list[dict[str, int]] = field(default_factory=list)
    splits: list[str] = field(default_factory=list)
    #: counterfactual pairs among the images: ``{"factor", "a", "b"}``, images a and b differ in that factor alone
    pairs: list[dict[str, Any]] = field(default_factory=list)
    #: how the task draws each image, as a study file names it (:mod:`crosspatch.study.images`):
    #: ``{split, seed, n, index}``, with ``factor`` and ``side`` for a pair's image
    origins: list[dict[str, Any]] = field(default_factory=list)
    task: str = "shapes"

    def __len__(self) -> int:
        return self.images.shape[0]

    def image(self, index: Any) -> torch.Tensor:
        """``[1, 3, H, W]``: image ``index`` (a ValueError naming the range when there is none)."""
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(self):
            raise ValueError(f"image must be an index 0 .. {len(self) - 1} of the gallery, got {index!r}")
        return self.images[index : index + 1]

    def origin(self, index: Any) -> dict[str, Any]:
        """How the task draws image ``index`` (a ValueError when the gallery does not know)."""
        self.image(index)
        if not self.origins:
            raise ValueError("these images were not drawn by a task, so a study file cannot name them")
        return dict(self.origins[index])

    def describe(self) -> list[dict[str, Any]]:
        return [{"index": i, "caption": c, "split": self.splits[i] if self.splits else None,
                 "png": png_data_url(self.images[i])} for i, c in enumerate(self.captions)]


def shapes_gallery(n: int = 12, seed: int = 0, pair_factors: tuple[str, ...] = ("colour", "shape", "x", "scale")) -> Gallery:
    """``n`` images of the ``shapes`` task, half from its train split and half held out (``test``), then
    one train-split pair for each of ``pair_factors``: two images that differ in that factor alone."""
    from ..zoo.tasks import get_task

    task = get_task("shapes")
    n_test = n // 2
    parts = [("train", task.sample(n - n_test, seed=seed, split="train")),
             ("test", task.sample(n_test, seed=seed, split="test"))]
    origins = [{"split": "train", "seed": seed, "n": n - n_test, "index": i} for i in range(n - n_test)]
    origins += [{"split": "test", "seed": seed, "n": n_test, "index": i} for i in range(n_test)]
    pairs = []
    for factor in pair_factors:
        pair = task.pairs(1, seed=seed, split="train", factor=factor)
        start = sum(len(batch.captions) for _, batch in parts)
        pairs.append({"factor": factor, "a": start, "b": start + 1})
        parts += [("train", pair.clean), ("train", pair.corrupt)]
        origins += [{"factor": factor, "side": side, "split": "train", "seed": seed, "n": 1, "index": 0}
                    for side in ("a", "b")]
    images, captions, factors, splits = [], [], [], []
    for split, batch in parts:
        images.append(batch.images)
        captions += list(batch.captions)
        columns = {k: v.tolist() for k, v in batch.factors.items()}
        factors += [{k: int(columns[k][i]) for k in columns} for i in range(len(batch.captions))]
        splits += [split] * len(batch.captions)
    return Gallery(torch.cat(images), captions, factors, splits, pairs, origins)
