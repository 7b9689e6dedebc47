"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``, "anyres"; LLaVA-OneVision packs the same way): each image is run as a resized whole image plus
a grid of crops at the tower's size, chosen from ``image_grid_pinpoints`` by the image's size; the crops'
features are stitched into one grid, the padding cut off, and a newline token added after each grid row.

One image per row: ``pixel_values`` ``[rows, 1 + crops, 3, H, W]`` and ``image_sizes`` ``[rows, 2]``, every
image of one size (so every row has the same crops and image tokens). The language model's families are
served as for LLaVA, with groups that say which image token comes from where (:func:`crop_groups`):
``image_base`` (the whole image), ``crop0`` ... (each crop, in raster order over the grid) and
``image_newline``. The tower runs ``rows * (1 + crops)`` images, so the ``vision.*`` and ``projector_out``
families, whose batch is the rows, are not served; with ``VLMAdapter(images_per_row=1 + crops)`` they are,
over ``[rows, image, ...]`` (``image=0`` the whole image, ``image=c + 1`` crop ``c``: :func:`with_images`).
"""

from __future__ import annotations

import inspect
from typing import Any, Mapping

import torch
from torch import nn

from crosspatch.sites.catalog import Catalog

from . import several
from .inputs import pixels_with
from .language import language_families
from . import llava
from .llava import anyres_crops, install_output_recorders

__all__ = ["is_anyres", "catalog", "with_images", "token_sources", "crop_groups", "prepare_images", "part_groups",
           "forward_kwargs", "describe", "example_inputs", "NOT_SERVED", "EMBED_IS_PROJECTOR_OUT"]

#: ``embed`` at the image positions is not ``projector_out``: the model packs the projected crops (unpadded, with
#: newlines) before they replace the image tokens.
EMBED_IS_PROJECTOR_OUT = False

NOT_SERVED = {
    "vision.*": "LLaVA-NeXT's tower runs the whole image and every crop of it (1 + crops images per row), not one per row",
    "projector_out": "the projector's batch is every crop of every image, not the rows",
}

BASE, NEWLINE = -1, -2


def is_anyres(model: nn.Module) -> bool:
    """A LLaVA-NeXT-style model: anyres grids, packed by the model's ``pack_image_features``."""
    return getattr(model.config, "image_grid_pinpoints", None) is not None and hasattr(model.model, "pack_image_features")


def catalog(model: nn.Module) -> Catalog:
    """The language model's families (the tower's batch is every crop: see :func:`with_images` for them)."""
    install_output_recorders(model)
    families, unavailable = language_families(model, model.model.language_model, lambda: example_inputs(model))
    return Catalog(families, type(model).__name__, unavailable={**NOT_SERVED, **unavailable})


def with_images(model: nn.Module, catalog: Catalog, k: int) -> Catalog:
    """Every family, the tower's and the projector's over ``[rows, image, ...]``: ``k`` tower images a row, the
    whole image (``image=0``) and ``k - 1`` crops (``image=c + 1`` is ``crop<c>``), for images of one size.
    Built from LLaVA's families (``catalog``, the language model's alone, has no tower family to extend)."""
    return several.with_images(llava.catalog(model, lambda: example_inputs(model)), k)


def crops(model: nn.Module, image_size: tuple[int, int]) -> int:
    """How many crops an image of ``image_size`` (height, width) is cut into (the whole image not counted)."""
    return anyres_crops(model, image_size)


def token_sources(model: nn.Module, image_size: tuple[int, int]) -> torch.Tensor:
    """For each image token of an image of ``image_size``, where it comes from: ``BASE`` (-1, the whole image),
    ``NEWLINE`` (-2) or the crop's index (raster order). Computed by the model's own ``pack_image_features``
    on stand-in features that hold their crop's index, so the layout is the model's by construction."""
    vision = model.config.vision_config
    side = vision.image_size // vision.patch_size
    n = crops(model, image_size)
    fake = torch.cat([torch.full((1, side * side, 1), float(BASE)),
                      torch.arange(n, dtype=torch.float).view(n, 1, 1).expand(n, side * side, 1)])
    pack = model.model.pack_image_features
    options = {"image_newline": torch.tensor([float(NEWLINE)])}
    wanted = inspect.signature(pack).parameters
    if "vision_feature_select_strategy" in wanted:  # LLaVA-NeXT
        options["vision_feature_select_strategy"] = getattr(model.config, "vision_feature_select_strategy", "default")
    if "vision_aspect_ratio" in wanted:  # LLaVA-OneVision
        options["vision_aspect_ratio"] = getattr(model.config, "vision_aspect_ratio", "anyres_max_9")
    packed, _ = pack([fake], torch.tensor([list(image_size)]), **options)
    labels = packed[0][:, 0]  # a list: one packed tensor per image
    if bool(((labels - labels.round()).abs() > 1e-6).any()):
        raise NotImplementedError(f"{type(model).__name__} resamples the crop grid of a {list(image_size)} image, so its "
                                  f"image tokens do not each come from one crop; crop groups are not served for it")
    return labels.round().long()


def crop_groups(model: nn.Module, ids: torch.Tensor, image_sizes: torch.Tensor, token: int) -> dict[str, torch.Tensor]:
    """``image_base``, ``image_newline`` and ``crop<i>`` masks ``[rows, pos]``: each row's image tokens, in order,
    labelled by :func:`token_sources` for its image's size."""
    image = ids.eq(token)
    out: dict[str, torch.Tensor] = {}
    for r in range(ids.shape[0]):
        sources = token_sources(model, tuple(int(v) for v in image_sizes[r])).to(ids.device)
        if int(image[r].sum()) != len(sources):
            raise ValueError(f"row {r} holds {int(image[r].sum())} image tokens; an image of size "
                             f"{image_sizes[r].tolist()} gives {len(sources)}")
        where = image[r].nonzero().flatten()
        names = {BASE: "image_base", NEWLINE: "image_newline", **{c: f"crop{c}" for c in range(int(sources.max()) + 1)}}
        for value, name in names.items():
            mask = out.setdefault(name, torch.zeros_like(image))
            mask[r, where[sources == value]] = True
    return out


def part_groups(model: nn.Module, prepared: Mapping[str, torch.Tensor], token: int | None, k: int) -> dict[str, torch.Tensor]:
    """Which image tokens come from the whole image, which from each crop (:func:`crop_groups`); with no
    image given, those of LLaVA (:func:`.llava.part_groups`)."""
    if "image_sizes" not in prepared:
        return llava.part_groups(model, prepared, token, k)
    return crop_groups(model, prepared["input_ids"], prepared["image_sizes"], token)


def forward_kwargs(model: nn.Module, inputs: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """The model's keyword arguments: its prepared ``inputs`` as they are (the model takes the crops per row)."""
    return inputs


def describe(model: nn.Module) -> dict[str, Any]:
    """LLaVA's description (:func:`.llava.describe`) without image tokens per image: they depend on its size."""
    return llava.describe(model, per_image_tokens=False)


def prepare_images(model: nn.Module, inputs: Mapping[str, Any], ids: torch.Tensor, device: torch.device,
                   k: int = 1) -> dict[str, torch.Tensor]:
    """``pixel_values`` ``[rows, 1 + crops, 3, H, W]`` (in the tower's dtype) and ``image_sizes`` ``[rows, 2]``, one
    image per row of one size (``1 + crops`` is ``k`` when the tower's families are served, ``k > 1``)."""
    rows = ids.shape[0]
    found = pixels_with(inputs, "image_sizes", "LLaVA-NeXT", "[images, 2]")
    if found is None:
        return {}
    pixels, sizes = found
    if pixels.ndim != 5 or pixels.shape[0] != rows or sizes.shape != (rows, 2) or bool((sizes != sizes[0]).any()) or (
            k > 1 and pixels.shape[1] != k):
        raise ValueError(
            f"pixel_values of shape {tuple(pixels.shape)} and image_sizes {sizes.tolist()} for {rows} rows; the vlm "
            f"adapter takes one image per row, all of one size: [rows, 1 + crops, 3, H, W] and [rows, 2]"
            + (f", with 1 + crops = {k} (VLMAdapter(images_per_row={k}))" if k > 1 else "")
        )
    return {"pixel_values": pixels.to(device=device, dtype=llava.pixel_dtype(model)), "image_sizes": sizes.to(device)}


def example_inputs(model: nn.Module, rows: int = 2, text: int = 5, seed: int = 0, images: int = 1) -> dict[str, torch.Tensor]:
    """``[bos, image tokens, text ...]`` with an image one tower-size high and two wide per row (the grid's
    crops, the whole image and newlines as the model packs them). One image a row whatever ``images`` (the
    tower images a row an adapter takes): its crops are the tower's other images."""
    config = model.config
    side = config.vision_config.image_size
    size = (side, 2 * side)
    token = config.image_token_id
    g = torch.Generator().manual_seed(seed)
    words = torch.randint(3, max(4, min(config.text_config.vocab_size, 1000)), (rows, text), generator=g)
    words[words == token] = 3
    n_image = len(token_sources(model, size))
    ids = torch.cat([torch.ones(rows, 1, dtype=torch.long), torch.full((rows, n_image), token), words], dim=1)
    dtype = next(model.model.vision_tower.parameters()).dtype
    pixels = torch.randn(rows, 1 + crops(model, size), config.vision_config.num_channels, side, side, generator=g)
    device = model.lm_head.weight.device
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels.to(dtype),
           "image_sizes": torch.tensor([list(size)] * rows)}
    return {k: v.to(device) for k, v in out.items()}
