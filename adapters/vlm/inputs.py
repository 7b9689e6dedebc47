"""Reading a processor's image inputs: ``pixel_values`` with the tensor that says how the model cuts them."""

from __future__ import annotations

from typing import Any, Mapping

import torch

__all__ = ["pixels_with"]


def pixels_with(inputs: Mapping[str, Any], key: str, model: str, shape: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(pixel_values, inputs[key])`` as tensors (the second as integers), None without pixels; an error naming
    ``key`` when pixels come without it (``model`` and ``shape`` say whose input it is and its shape)."""
    pixels, other = inputs.get("pixel_values"), inputs.get(key)
    if pixels is None:
        return None
    if other is None:
        raise ValueError(f"{model} inputs with pixel_values need {key} ({shape}), as the processor returns")
    return torch.as_tensor(pixels), torch.as_tensor(other).long()
