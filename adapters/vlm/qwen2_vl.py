"""Qwen2-VL (``Qwen2VLForConditionalGeneration``): the vision tower, the merger and the language model's
families, and position groups.

Qwen2-VL's vision tower runs every image's patches as one flat sequence, with each image's size in
``image_grid_thw``; the merger's output is flat too. With one image per row and one grid for all rows,
the flat sequence splits into rows, and :mod:`.qwen2_vision` serves both under ``vision.*`` and
``projector_out``. The language model's multimodal rotary positions are computed by the model from
``image_grid_thw`` and ``mm_token_type_ids``.

Inputs are what the processor returns (``input_ids``, ``attention_mask``, ``pixel_values``
``[patches, features]``, ``image_grid_thw`` ``[images, 3]``, ``mm_token_type_ids``), with one image per row
and every image of the same grid. Prepared inputs hold ``pixel_values`` per row, ``[rows, patches,
features]``, so the engine tiles and slices them with the rows; the forward flattens them back.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from crosspatch.sites.catalog import Catalog
from crosspatch.sites.selection import GROUP_PREFIX

from . import several
from .inputs import pixels_with
from .language import language_families
from .llava import install_output_recorders
from .qwen2_vision import vision_families

__all__ = ["is_served", "catalog", "with_images", "prepare_images", "part_groups", "model_inputs", "forward_kwargs", "describe",
           "example_inputs", "EMBED_IS_PROJECTOR_OUT"]

#: ``embed`` at the image positions is ``projector_out`` (the merger's output) as it is.
EMBED_IS_PROJECTOR_OUT = True


def is_served(model: nn.Module) -> bool:
    """``model.visual`` with Qwen2-VL-style blocks (``blocks[i].attn.qkv`` and ``.proj``), ``model.language_model``
    and an ``lm_head``."""
    base = getattr(model, "model", None)
    blocks = getattr(getattr(base, "visual", None), "blocks", None)
    attn = getattr(blocks[0], "attn", None) if isinstance(blocks, nn.ModuleList) and len(blocks) else None
    return (hasattr(attn, "qkv") and hasattr(attn, "proj") and hasattr(base, "language_model")
            and hasattr(model, "lm_head"))


def catalog(model: nn.Module) -> Catalog:
    install_output_recorders(model)
    vision, vision_unavailable = vision_families(model)
    families, unavailable = language_families(model, model.model.language_model, lambda: example_inputs(model))
    return Catalog(vision + families, type(model).__name__, unavailable={**vision_unavailable, **unavailable})


def _token(model: nn.Module) -> int:
    return model.config.image_token_id


def with_images(model: nn.Module, catalog: Catalog, k: int) -> Catalog:
    """The catalog for ``k`` images a row: ``catalog``'s (one a row) with the tower's and merger's families
    over ``[rows, image, ...]`` (:func:`.several.with_images`)."""
    return several.with_images(catalog, k)


def prepare_images(model: nn.Module, inputs: Mapping[str, Any], ids: torch.Tensor, device: torch.device,
                   k: int = 1) -> dict[str, torch.Tensor]:
    """The images (:func:`_images`) and ``mm_token_type_ids`` (those given, else 1 on the image tokens of ``ids``)."""
    out = _images(model, inputs, ids.shape[0], device, k)
    types = inputs.get("mm_token_type_ids")
    types = token_types(model, ids) if types is None else torch.as_tensor(types)
    out["mm_token_type_ids"] = (types.unsqueeze(0) if types.ndim == 1 else types).to(device=device, dtype=torch.long)
    return out


def _images(model: nn.Module, inputs: Mapping[str, Any], rows: int, device: torch.device, k: int) -> dict[str, torch.Tensor]:
    """``pixel_values`` as ``[rows, k * patches, features]`` and ``image_grid_thw`` as ``[rows, 3]`` (``[rows, k, 3]``
    for ``k`` images a row), so both follow the rows when the engine tiles or slices them."""
    found = pixels_with(inputs, "image_grid_thw", "Qwen2-VL", "[images, 3]")
    if found is None:
        return {}
    pixels, grid = found
    grid = grid.reshape(-1, 3)
    if grid.shape[0] != rows * k or bool((grid != grid[0]).any()):
        raise ValueError(
            f"image_grid_thw {grid.tolist()} for {rows} rows: the vlm adapter takes "
            + ("one image per row" if k == 1 else f"{k} images per row") + ", all of one grid (resize the images to one "
            "size; several a row: VLMAdapter(images_per_row=k))"
        )
    patches = k * int(grid[0].prod())
    if pixels.ndim == 2:  # the processor's flat [patches of every image, features]
        pixels = pixels.view(rows, -1, pixels.shape[-1])
    if pixels.ndim != 3 or pixels.shape[0] != rows or pixels.shape[1] != patches:
        raise ValueError(f"pixel_values of shape {tuple(pixels.shape)} do not hold {patches} patches per row")
    dtype = model.model.visual.patch_embed.proj.weight.dtype
    grid = grid.view(rows, k, 3) if k > 1 else grid
    return {"pixel_values": pixels.to(device=device, dtype=dtype), "image_grid_thw": grid.to(device)}


def model_inputs(inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The keyword arguments of the model's forward: pixels flattened back, the multimodal token types."""
    out = {k: inputs[k] for k in ("input_ids", "attention_mask") if k in inputs}
    if "pixel_values" in inputs:
        pixels = inputs["pixel_values"]
        out["pixel_values"] = pixels.reshape(-1, pixels.shape[-1])
        out["image_grid_thw"] = inputs["image_grid_thw"].reshape(-1, 3)  # [rows * k, 3], each row's images in turn
    out["mm_token_type_ids"] = inputs["mm_token_type_ids"]
    return out


def forward_kwargs(model: nn.Module, inputs: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """The model's keyword arguments from its prepared ``inputs`` (:func:`model_inputs`)."""
    return model_inputs(inputs)


def part_groups(model: nn.Module, prepared: Mapping[str, torch.Tensor], token: int | None, k: int) -> dict[str, torch.Tensor]:
    """For ``k > 1`` images a row, ``image0`` ... (each image's tokens: :func:`.several.image_groups`); none for one."""
    if k == 1:
        return {}
    return several.image_groups(prepared[GROUP_PREFIX + "image"], k, image_tokens(model, prepared["image_grid_thw"]))


def describe(model: nn.Module) -> dict[str, Any]:
    """The class, the tower's (with its patch merging) and the language model's sizes."""
    config = model.config
    t, v = config.text_config, config.vision_config
    return {"class": type(model).__name__, "library": "transformers", "model_type": config.model_type,
            "vision": {"n_layers": v.depth, "n_heads": v.num_heads, "d_model": v.embed_dim,
                       "patch_size": v.patch_size, "spatial_merge_size": v.spatial_merge_size},
            "text": {"n_layers": t.num_hidden_layers, "n_heads": t.num_attention_heads, "d_model": t.hidden_size},
            "name_or_path": getattr(config, "name_or_path", "") or "",
            "dtype": str(model.lm_head.weight.dtype).removeprefix("torch.")}


def image_tokens(model: nn.Module, grid: torch.Tensor) -> int:
    """Image tokens per image of ``grid`` (``image_grid_thw``): its patches over ``spatial_merge_size ** 2``."""
    return int(grid.reshape(-1, 3)[0].prod()) // model.config.vision_config.spatial_merge_size ** 2


def token_types(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """``mm_token_type_ids`` as the processor makes them: 1 on image tokens, 0 elsewhere."""
    return ids.eq(_token(model)).long()


def _special(config, at: str) -> int:
    """The id of the token before (``at="start"``) or after (``"end"``) an image's tokens."""
    for key in (f"vision_{at}_token_id", f"image_{at}_token_id"):
        if isinstance(getattr(config, key, None), int):
            return getattr(config, key)
    raise NotImplementedError(f"{type(config).__name__} names no vision_{at}_token_id or image_{at}_token_id; "
                              f"example inputs for it are not written")


def example_inputs(model: nn.Module, rows: int = 2, text: int = 5, seed: int = 0, grid: int = 4,
                   images: int = 1) -> dict[str, torch.Tensor]:
    """``[bos, (vision start, image tokens, vision end) x images, text ...]`` with ``grid`` x ``grid`` patch images."""
    config, vision = model.config, model.config.vision_config
    merge = vision.spatial_merge_size
    g = torch.Generator().manual_seed(seed)
    words = torch.randint(3, max(4, min(config.text_config.vocab_size, 1000)), (rows, text), generator=g)
    start, end = (_special(config, at) for at in ("start", "end"))
    for token in {config.image_token_id, start, end}:
        words[words == token] = 3
    n_image = grid * grid // merge ** 2
    image = [torch.full((rows, 1), start), torch.full((rows, n_image), config.image_token_id), torch.full((rows, 1), end)]
    ids = torch.cat([torch.ones(rows, 1, dtype=torch.long), *image * images, words], dim=1)
    features = vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2
    pixels = torch.randn(rows, images * grid * grid, features, generator=g)
    device = model.lm_head.weight.device
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels,
           "image_grid_thw": torch.tensor([[1, grid, grid]] * (rows * images)), "mm_token_type_ids": token_types(model, ids)}
    return {k: v.to(device) for k, v in out.items()}
