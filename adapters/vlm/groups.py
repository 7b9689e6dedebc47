"""Position groups of a vision-language model's inputs: named sets of token positions, one mask per row.

A group is a boolean mask ``[rows, pos]`` carried with the prepared inputs under ``group.<name>``
(:data:`crosspatch.sites.selection.GROUP_PREFIX`), so the engine tiles it with the rows and any
selection or :class:`~crosspatch.engine.knockout.Knockout` can name it. Three groups come from the
inputs themselves:

- ``image``: the image-token positions (``input_ids == image_token_id``),
- ``text``: every other real token (the attention mask's 1s),
- ``last``: each row's last real token,
- ``prefix`` / ``suffix`` when the inputs have ``token_type_ids`` (PaliGemma): the real tokens of type 0,
  which attend to each other both ways, and of type 1,
- ``image_base``, ``crop0``, ``crop1`` ..., ``image_newline`` for LLaVA-NeXT (:mod:`.llava_next`).

Others are given with the inputs, ``{"groups": {"question": spec}}``, where ``spec`` is a span
``(start, stop)`` shared by every row, a list of one span per row, or a mask ``[pos]`` / ``[rows, pos]``.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import torch

from crosspatch.sites.selection import GROUP_PREFIX

__all__ = ["BUILTIN_GROUPS", "group_masks"]

BUILTIN_GROUPS = ("image", "text", "last", "prefix", "suffix", "image_base", "image_newline")


def _mask(name: str, spec: Any, rows: int, columns: int, device: torch.device) -> torch.Tensor:
    if isinstance(spec, torch.Tensor):  # a mask; spans are tuples or lists
        mask = spec.to(device=device).bool()
        if mask.ndim == 1:
            mask = mask.unsqueeze(0).expand(rows, -1)
        if tuple(mask.shape) != (rows, columns):
            raise ValueError(f"group {name!r}: a mask is [pos] or [rows, pos] = [{rows}, {columns}], got {tuple(mask.shape)}")
        return mask.clone()
    spans = spec if isinstance(spec, (list,)) and spec and isinstance(spec[0], (tuple, list)) else [spec] * rows
    if len(spans) != rows:
        raise ValueError(f"group {name!r}: {len(spans)} spans for {rows} rows; give one span per row or one for all")
    mask = torch.zeros(rows, columns, dtype=torch.bool, device=device)
    for r, span in enumerate(spans):
        try:
            start, stop = (int(v) for v in span)
        except (TypeError, ValueError):
            raise ValueError(
                f"group {name!r}: expected a span (start, stop), a list of spans (one per row) or a boolean mask "
                f"[rows, pos]; got {span!r}"
            ) from None
        lo, hi, _ = slice(start, stop).indices(columns)
        if hi <= lo:
            raise ValueError(f"group {name!r}: the span {span!r} of row {r} holds no position of {columns}")
        mask[r, lo:hi] = True
    return mask


def group_masks(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, image_token_id: int | None,
    given: Mapping[str, Any] | None = None, token_type_ids: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """``{"group.<name>": mask [rows, pos]}``: the built-in groups and the ``given`` ones."""
    rows, columns = input_ids.shape
    real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.ne(0)
    image = input_ids.eq(image_token_id) & real if image_token_id is not None else torch.zeros_like(real)
    ends = (real * torch.arange(1, columns + 1, device=real.device)).amax(dim=1)
    if bool((ends == 0).any()):
        raise ValueError(f"rows {(ends == 0).nonzero().flatten().tolist()} hold no real token (attention mask all 0)")
    last = torch.zeros_like(real)
    last[torch.arange(rows, device=real.device), ends - 1] = True
    out = {"image": image, "text": real & ~image, "last": last}
    if token_type_ids is not None:
        out["prefix"], out["suffix"] = real & token_type_ids.eq(0), real & token_type_ids.ne(0)
    for name, spec in (given or {}).items():
        if name in BUILTIN_GROUPS or re.fullmatch(r"crop\d+", str(name)):
            raise ValueError(f"group {name!r} is built in ({', '.join(BUILTIN_GROUPS)}, crop<i>); give your group another name")
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"a group name is an identifier such as 'question', got {name!r}")
        out[name] = _mask(name, spec, rows, columns, input_ids.device)
    return {GROUP_PREFIX + name: mask for name, mask in out.items()}
