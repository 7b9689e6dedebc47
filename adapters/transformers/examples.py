"""Example inputs of a transformers model, and its image inputs batched for a run.

Language models take token ids; vision encoders (ViT, DINOv2, SigLIP's image classifier: models whose
``main_input_name`` is ``pixel_values``) take images ``[batch, channels, height, width]`` of the
config's size. Architecture inference, its proof and ``crosspatch verify`` run on these examples.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from crosspatch.engine.adapter import Inputs, model_device

__all__ = ["takes_images", "example_inputs", "forward_kwargs", "prepare_images"]


def takes_images(model: nn.Module) -> bool:
    return getattr(model, "main_input_name", None) == "pixel_values"


def _image_config(model: nn.Module) -> Any:
    config = model.config
    return getattr(config, "vision_config", None) or config


def example_inputs(model: nn.Module, seed: int = 0, rows: int = 2, length: int = 7) -> torch.Tensor:
    """Seeded token ids ``[rows, length]`` below the vocabulary size (at most 1000), or for a vision
    encoder seeded images ``[rows, channels, size, size]`` of the config's image size."""
    gen = torch.Generator().manual_seed(seed)
    if takes_images(model):
        config = _image_config(model)
        size = getattr(config, "image_size", 224)
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        channels = getattr(config, "num_channels", 3)
        return torch.randn(rows, channels, height, width, generator=gen)
    return torch.randint(0, min(_vocabulary(model), 1000), (rows, length), generator=gen)


def _vocabulary(model: nn.Module) -> int:
    """The input embedding's rows, else the config's (or its text config's) vocabulary size, else 2."""
    try:
        embedding = model.get_input_embeddings()
    except (NotImplementedError, AttributeError):
        embedding = None
    if isinstance(getattr(embedding, "num_embeddings", None), int):
        return embedding.num_embeddings
    config = model.config
    return getattr(config, "vocab_size", None) or getattr(getattr(config, "text_config", None), "vocab_size", None) or 2


def forward_kwargs(model: nn.Module, inputs: torch.Tensor) -> dict[str, Any]:
    """Keyword arguments of a bare forward on :func:`example_inputs` (on the model's device), no cache kept."""
    inputs = inputs.to(model_device(model))
    if takes_images(model):
        return {"pixel_values": inputs.to(model.dtype)}
    return {"input_ids": inputs, "use_cache": False}


def prepare_images(model: nn.Module, inputs: Any) -> Inputs:
    """Images (a tensor ``[batch, channels, height, width]``, one image without the batch axis, or a dict
    with ``pixel_values``) as the batch a vision encoder takes, in the model's dtype and on its device."""
    if isinstance(inputs, Mapping):
        prepared = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    else:
        prepared = {"pixel_values": inputs if isinstance(inputs, torch.Tensor) else torch.as_tensor(inputs)}
    pixels = prepared.get("pixel_values")
    if pixels is None or not pixels.is_floating_point() or pixels.ndim not in (3, 4):
        got = "no pixel_values" if pixels is None else f"pixel_values {pixels.dtype} of shape {tuple(pixels.shape)}"
        raise ValueError(f"{type(model).__name__} takes images: float pixel_values [batch, channels, height, width]; got {got}")
    device = model_device(model)
    out = {k: v.to(device) for k, v in prepared.items()}
    out["pixel_values"] = (pixels if pixels.ndim == 4 else pixels.unsqueeze(0)).to(device, model.dtype)
    return out
