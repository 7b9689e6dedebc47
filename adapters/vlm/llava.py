"""LLaVA-style models: a vision tower, a projector and a decoder LM, laid out as ``model.vision_tower``,
``model.multi_modal_projector``, ``model.language_model`` (``LlavaForConditionalGeneration`` with a CLIP tower,
``PaliGemmaForConditionalGeneration`` with a SigLIP tower and a Gemma LM whose prefix attends both ways) or
as ``model.vision_model``, ``model.connector``, ``model.text_model`` (``Idefics3ForConditionalGeneration``,
SmolVLM: a SigLIP-style tower and a pixel-shuffle connector).

The families come from the code that serves each part alone, so they hold the same values:

- ``vision.*``: the vision tower under the names of the CLIP adapter (:mod:`crosspatch.adapters.transformers.clip`),
  exact per head (``vision.head_out`` + the output bias = ``vision.attn_out``); their batch is the images,
  one per row. ``vision.logits_in`` (CLIP's pooled readout) is left out: the projector reads the
  feature layer's positions, not a pooled token.
- ``projector_out``: the projected image features ``[images, pos, d_text]``, before they replace the
  image-token embeddings.
- the language model's families, built by the transformers adapter's table or inference for the LM
  alone (``resid_pre``, ``head_out``, ``attn_pattern``, ``head_in`` ...), ``embed`` being the merged
  embeddings the first block reads (image features in the image positions), and ``logits``.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import replace
from typing import Any, Mapping

import torch
from torch import nn

from crosspatch.engine.reach import ModuleOutput, temporarily
from crosspatch.sites.catalog import Axis, Catalog, SiteFamily
from crosspatch.sites.selection import GROUP_PREFIX

from crosspatch.adapters.transformers.clip import _tower_families

from . import several
from .language import language_families
from .reaches import OutputFirst, TokenGrid

__all__ = ["is_served", "catalog", "parts", "example_inputs", "image_tokens", "images_per_row_axis", "pixel_dtype", "image_hw",
           "prepare_pixels", "with_images", "prepare_images", "part_groups", "forward_kwargs", "describe",
           "EMBED_IS_PROJECTOR_OUT"]

#: ``embed`` at the image positions is ``projector_out`` as it is (the projected features replace the image tokens).
EMBED_IS_PROJECTOR_OUT = True

# (vision tower, projector, language model) attribute names of the base model, per layout.
_LAYOUTS = (("vision_tower", "multi_modal_projector", "language_model"), ("vision_model", "connector", "text_model"))


def _layout(model: nn.Module) -> tuple[str, str, str] | None:
    base = getattr(model, "model", None)
    return next((names for names in _LAYOUTS if all(hasattr(base, n) for n in names)), None)


def is_served(model: nn.Module) -> bool:
    """One of the layouts, with a CLIP- or SigLIP-style tower (``encoder.layers[i].self_attn.out_proj``)."""
    names = _layout(model)
    if names is None or not hasattr(model, "lm_head"):
        return False
    layers = getattr(getattr(getattr(model.model, names[0]), "encoder", None), "layers", None)
    return isinstance(layers, nn.ModuleList) and len(layers) > 0 and hasattr(getattr(layers[0], "self_attn", None), "out_proj")


def parts(model: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(vision tower, projector, language model) of a served model."""
    return tuple(getattr(model.model, name) for name in _layout(model))  # type: ignore[return-value]


def images_per_row_axis(model: nn.Module) -> bool:
    """Whether the model takes ``pixel_values`` as ``[rows, images, 3, H, W]`` (Idefics3) rather than ``[rows, 3, H, W]``."""
    return _layout(model) == _LAYOUTS[1]


class _Shell(nn.Module):
    """Holds the vision tower under the attribute the CLIP families are written against (``vision_model``),
    without copying or moving it: hooks land on the tower's own modules."""

    def __init__(self, tower: nn.Module):
        super().__init__()
        self.vision_model = tower


def _has_class_token(tower: nn.Module) -> bool:
    return hasattr(tower, "pre_layrnorm")  # CLIP's tower has a class token and a pre-norm; SigLIP's neither


def pixel_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the vision tower's weights (and so its pixels) have."""
    return next(parts(model)[0].parameters()).dtype


def image_hw(model: nn.Module) -> tuple[int, int]:
    """The vision config's image size as (height, width)."""
    size = model.config.vision_config.image_size
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[-1]))


_TOKENS: "weakref.WeakKeyDictionary[nn.Module, torch.Size]" = weakref.WeakKeyDictionary()


def _projected_shape(model: nn.Module) -> torch.Size:
    """The projector's output for one image at the config's size, measured once per model (transformers'
    ``get_image_features``): it says how many image tokens an image gives whatever the projector does
    (drop the class token, Idefics3's pixel shuffle, Gemma 3's pooling, a 2-d grid of tokens ...). For
    anyres models (LLaVA-NeXT) it is the tokens of one crop, before the model packs the crops."""
    found = _TOKENS.get(model)
    if found is None:
        projector = parts(model)[1]
        install_output_recorders(model)
        pixels = torch.ones(1, model.config.vision_config.num_channels, *image_hw(model),  # not 0: Idefics3 drops all-0 images
                             dtype=pixel_dtype(model), device=model.lm_head.weight.device)
        seen: list[torch.Size] = []
        with temporarily() as changes, torch.no_grad():
            changes.forward_hook(projector, lambda module, args, output: seen.append(output.shape))
            if getattr(model.config, "image_grid_pinpoints", None) is not None:  # anyres: the tower's batch is the crops
                n = 1 + anyres_crops(model, image_hw(model))
                model.model.get_image_features(pixel_values=pixels.unsqueeze(1).expand(1, n, *pixels.shape[1:]),
                                               image_sizes=torch.tensor([image_hw(model)]))
            else:
                model.model.get_image_features(pixel_values=pixels.unsqueeze(1) if images_per_row_axis(model) else pixels)
        if not seen:
            raise NotImplementedError(f"{type(model).__name__}'s image features do not pass through its projector")
        found = _TOKENS[model] = seen[-1]
    return found


def anyres_crops(model: nn.Module, image_size: tuple[int, int]) -> int:
    """How many crops an anyres model (LLaVA-NeXT) cuts an image of ``image_size`` (height, width) into, the whole
    image not counted: the grid transformers picks from ``image_grid_pinpoints``."""
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

    rows, columns = get_anyres_image_grid_shape(list(image_size), model.config.image_grid_pinpoints,
                                                model.config.vision_config.image_size)
    return int(rows) * int(columns)


def image_tokens(model: nn.Module) -> int:
    """Image tokens per image: the positions of the projector's output for one image (the patches, plus the
    class token when the projector keeps it; fewer when the projector merges patches)."""
    return math.prod(_projected_shape(model)[1:-1])


def install_output_recorders(model: nn.Module) -> None:
    """Install now the hooks transformers installs on a model's first forward to record hidden states (the
    projector reads the vision tower's through them). Installed inside a run, they would count as hooks
    that run left behind, and removing them would leave the tower without hidden states."""
    try:
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY, maybe_install_capturing_hooks
    except ImportError:  # a transformers that records hidden states without hooks
        return
    for module in model.modules():
        if _CAN_RECORD_REGISTRY.get(module):
            maybe_install_capturing_hooks(module)


def feature_blocks(model: nn.Module) -> int:
    """How many vision blocks reach the projector: those up to the hidden state it reads
    (``vision_feature_layer``; PaliGemma and Idefics3 read the last block's output, post-normed)."""
    n_vision = len(parts(model)[0].encoder.layers)
    layer = getattr(model.config, "vision_feature_layer", -1)
    if not isinstance(layer, int):
        raise NotImplementedError(
            f"{type(model).__name__} concatenates vision hidden states {list(layer)}; one feature layer is served"
        )
    if not -(n_vision + 1) <= layer <= n_vision:
        raise ValueError(f"vision_feature_layer {layer} is out of range for {n_vision} vision blocks")
    used = layer % (n_vision + 1)  # hidden state k is the output of block k - 1 (0: the embeddings)
    if used == 0:
        raise NotImplementedError(f"{type(model).__name__} reads the vision embeddings only; no vision block reaches it")
    return used


def catalog(model: nn.Module, example=None) -> Catalog:
    """``example`` gives the whole model's inputs (for the in-context proof of ``attn_pattern``); default
    :func:`example_inputs`."""
    tower, projector, lm = parts(model)
    install_output_recorders(model)
    config = model.config
    used = feature_blocks(model)
    shell = _Shell(tower)
    vision = [f for f in _tower_families(shell, "vision") if f.name != "vision.logits_in"]
    # Blocks after the feature layer never reach the output (LLaVA reads hidden state -2): not served.
    vision = [replace(f, layers=used) if f.layers is not None else f for f in vision]
    vision = [replace(f, reach=OutputFirst(shell, "vision_model.encoder.layers.{layer}")) if f.name == "vision.resid_post"
              else f for f in vision]
    if not _has_class_token(tower):  # SigLIP: the patch embeddings enter the first block as they are
        vision = [replace(f, reach=ModuleOutput(shell, "vision_model.embeddings"), doc="patch embeddings entering the first block")
                  if f.name == "vision.embed" else f for f in vision]
    d_text = config.text_config.hidden_size
    families = vision + [
        SiteFamily("projector_out", (Axis("pos", image_tokens(model)), Axis("dim", d_text)),
                   ModuleOutput(projector, "") if len(_projected_shape(model)) == 3 else TokenGrid(projector),
                   doc="projected image features, one per image token (before they replace the image-token embeddings)"),
    ]
    text, unavailable = language_families(model, lm, example or (lambda: example_inputs(model)))
    families += text
    return Catalog(families, type(model).__name__, unavailable=unavailable)


def with_images(model: nn.Module, catalog: Catalog, k: int) -> Catalog:
    """The catalog for ``k`` images a row: ``catalog``'s (one a row) with the tower's and projector's families
    over ``[rows, image, ...]`` (:func:`.several.with_images`)."""
    return several.with_images(catalog, k)


def prepare_images(model: nn.Module, inputs: Mapping[str, Any], ids: torch.Tensor, device: torch.device,
                   k: int = 1) -> dict[str, torch.Tensor]:
    """``pixel_values`` per row (:func:`prepare_pixels`) in the tower's dtype, when ``inputs`` hold any."""
    pixels = inputs.get("pixel_values")
    if pixels is None:
        return {}
    pixels = prepare_pixels(model, torch.as_tensor(pixels), ids.shape[0], k)
    return {"pixel_values": pixels.to(device=device, dtype=pixel_dtype(model))}


def part_groups(model: nn.Module, prepared: Mapping[str, torch.Tensor], token: int | None, k: int) -> dict[str, torch.Tensor]:
    """For ``k > 1`` images a row, ``image0`` ... (each image's tokens: :func:`.several.image_groups`); none for one."""
    if k == 1:
        return {}
    return several.image_groups(prepared[GROUP_PREFIX + "image"], k, image_tokens(model))


def forward_kwargs(model: nn.Module, inputs: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """The model's keyword arguments from its prepared ``inputs``: ``k > 1`` images a row flattened to
    ``[rows * k, 3, H, W]``, unless the model takes them per row (Idefics3)."""
    if k > 1 and not images_per_row_axis(model):
        inputs = {**inputs, "pixel_values": inputs["pixel_values"].flatten(0, 1)}
    return inputs


def describe(model: nn.Module, per_image_tokens: bool = True) -> dict[str, Any]:
    """The class, the tower's and the language model's sizes and, with ``per_image_tokens``, the image tokens
    of one image (LLaVA-NeXT's depend on each image's size)."""
    config = model.config
    v, t = config.vision_config, config.text_config
    return {
        "class": type(model).__name__, "library": "transformers", "model_type": config.model_type,
        "vision": {"n_layers": v.num_hidden_layers, "n_heads": v.num_attention_heads, "d_model": v.hidden_size,
                   "image_size": v.image_size, "patch_size": v.patch_size},
        "text": {"n_layers": t.num_hidden_layers, "n_heads": t.num_attention_heads, "d_model": t.hidden_size},
        **({"image_tokens": image_tokens(model)} if per_image_tokens else {}),
        "name_or_path": getattr(config, "name_or_path", "") or "",
        "dtype": str(model.lm_head.weight.dtype).removeprefix("torch."),
    }


def prepare_pixels(model: nn.Module, pixels: torch.Tensor, rows: int, k: int = 1) -> torch.Tensor:
    """``pixel_values`` per row: ``[rows, 3, H, W]`` (Idefics3: ``[rows, 1, 3, H, W]``) for one image a row,
    ``[rows, k, 3, H, W]`` for ``k``; the processor's flat ``[rows * k, 3, H, W]`` is accepted too."""
    pixels = pixels.unsqueeze(0) if pixels.ndim == 3 else pixels
    if pixels.ndim == 4 and (k > 1 or images_per_row_axis(model)) and pixels.shape[0] == rows * k:
        pixels = pixels.unflatten(0, (rows, k))
    wanted = (rows, k) if pixels.ndim == 5 else (rows,)
    if tuple(pixels.shape[:len(wanted)]) != wanted or (k > 1 and pixels.ndim != 5) or (pixels.ndim == 5 and pixels.shape[1] != k):
        shape = "[rows, 1, 3, H, W]" if images_per_row_axis(model) else "[rows, 3, H, W]"
        raise ValueError(
            f"pixel_values of shape {tuple(pixels.shape)} for {rows} rows; "
            + (f"{k} images a row are [rows, {k}, 3, H, W] or [rows * {k}, 3, H, W]" if k > 1 else
               f"the vlm adapter takes one image per row, {shape} (several: VLMAdapter(images_per_row=k))")
        )
    return pixels


def example_inputs(model: nn.Module, rows: int = 2, text: int = 5, seed: int = 0, images: int = 1) -> dict[str, torch.Tensor]:
    """Seeded inputs ``[image tokens, bos, text ...]`` (``images`` images a row, each block of image tokens
    followed by one text token) at the config's image size."""
    config = model.config
    vision = config.vision_config
    token = getattr(config, "image_token_id", getattr(config, "image_token_index", None))
    g = torch.Generator().manual_seed(seed)
    vocab = config.text_config.vocab_size
    words = torch.randint(3, max(4, min(vocab, 1000)), (rows, text + images - 1), generator=g)
    words[words == token] = 3
    blocks = [torch.full((rows, image_tokens(model)), token)]
    for i in range(1, images):  # the next image after one text token
        blocks += [words[:, text + i - 1:text + i], torch.full((rows, image_tokens(model)), token)]
    ids = torch.cat([*blocks, torch.ones(rows, 1, dtype=torch.long), words[:, :text]], 1)
    pixels = torch.randn(rows, images, vision.num_channels, *image_hw(model), generator=g).to(pixel_dtype(model))
    if images == 1 and not images_per_row_axis(model):
        pixels = pixels.squeeze(1)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}
    if model.config.model_type == "paligemma":
        out["token_type_ids"] = torch.zeros_like(ids)
    device = model.lm_head.weight.device
    return {k: v.to(device) for k, v in out.items()}
