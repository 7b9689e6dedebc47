"""Several images per row for LLaVA-style models (``VLMAdapter(images_per_row=k)``).

The tower and the projector run every image of every row as one batch ``[rows * k, ...]`` (row-major: the
processor's order, each row's images in turn). Their families gain an axis ``image`` of size ``k`` after the
rows, ``[rows, image, pos, ...]`` (:class:`ImagesOfRow`), so sites stay bound to rows; the language model's
families are unchanged. Groups ``image0`` ... ``image<k-1>`` hold each image's tokens (:func:`image_groups`).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from crosspatch.sites.catalog import Axis, Catalog, LinearFrom, SiteFamily

__all__ = ["ImagesOfRow", "with_images", "image_groups", "is_per_image"]


def is_per_image(name: str) -> bool:
    """Whether family ``name`` is computed per image (the tower and the projector)."""
    return name.startswith("vision.") or name == "projector_out"


class ImagesOfRow:
    """A reach over a batch of ``rows * k`` images, called back with ``[rows, k, ...]``; a new value is
    flattened back."""

    def __init__(self, inner, k: int):
        self.inner, self.k = inner, k

    def install(self, layer: int | None, callback) -> list:
        k = self.k

        def per_row(value: torch.Tensor):
            if value.shape[0] % k:
                raise RuntimeError(f"the vision batch holds {value.shape[0]} images, not {k} per row")
            new = callback(value.unflatten(0, (-1, k)))
            return None if new is None else new.flatten(0, 1)

        return self.inner.install(layer, per_row)


def _linear(linear: LinearFrom) -> LinearFrom:
    def apply(z: torch.Tensor, layer: int | None) -> torch.Tensor:
        return linear.apply(z.flatten(0, 1), layer).unflatten(0, z.shape[:2])

    return replace(linear, shared=("image", *linear.shared), apply=apply)


def with_images(catalog: Catalog, k: int) -> Catalog:
    """``catalog`` (one image per row) with every per-image family over ``[rows, image, ...]``, ``k`` images a row."""
    families = []
    for fam in catalog:
        if is_per_image(fam.name):
            fam = replace(fam, axes=(Axis("image", k), *fam.axes), reach=ImagesOfRow(fam.reach, k),
                          linear_from=None if fam.linear_from is None else _linear(fam.linear_from))
        families.append(fam)
    return Catalog(families, catalog.model_name, unavailable=catalog.unavailable)


def image_groups(image: torch.Tensor, k: int, per_image: int) -> dict[str, torch.Tensor]:
    """``image<i>``: the ``i``-th block of ``per_image`` image tokens of each row (``image`` ``[rows, pos]``)."""
    counts = image.sum(1)
    if bool((counts != k * per_image).any()):
        raise ValueError(f"rows hold {counts.tolist()} image tokens; {k} images of {per_image} tokens each give "
                         f"{k * per_image}")
    order = torch.cumsum(image.long(), dim=1) - 1  # the index of each image token within its row
    return {f"image{i}": image & (order // per_image == i) for i in range(k)}
