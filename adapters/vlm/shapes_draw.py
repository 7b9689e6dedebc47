"""Drawing ``shapes`` factors for ``shapes-vlm``: which images a split holds, and rows paired by shape."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["draw_factors", "partners"]


def draw_factors(task, n: int, split: str, gen: torch.Generator, recipe: Any = None) -> dict[str, torch.Tensor]:
    """Factors of ``n`` images of ``split`` (``"train"`` or ``"test"``, the held-out images) under
    ``recipe.held_out``: ``"scale"`` holds out one scale (every shape-colour combination in both splits),
    ``"combinations"`` the task's held-out shape-colour combinations (every scale in both). ``recipe`` (a
    :class:`~.zoo.Recipe`; default: held-out combinations) gives ``held_out`` and ``held_out_scale``."""
    held_out = "combinations" if recipe is None else recipe.held_out
    if held_out == "combinations":
        combos, scales = task.combinations(split), list(range(task.sizes["scale"]))
    elif held_out == "scale":
        combos = task.combinations("train") + task.combinations("test")
        held = task.values["scale"].index(recipe.held_out_scale)
        scales = [held] if split == "test" else [s for s in range(task.sizes["scale"]) if s != held]
    else:
        raise ValueError(f"held_out is 'scale' or 'combinations', got {held_out!r}")
    combos_t = torch.tensor(combos, dtype=torch.long)
    pick = torch.randint(len(combos_t), (n,), generator=gen)
    out = {"shape": combos_t[pick, 0], "colour": combos_t[pick, 1],
           "scale": torch.tensor(scales)[torch.randint(len(scales), (n,), generator=gen)]}
    for f in ("x", "y", "rotation"):
        out[f] = torch.randint(task.sizes[f], (n,), generator=gen)
    return out


def partners(factors: dict[str, torch.Tensor], allowed: torch.Tensor, gen, factor: str = "shape") -> dict[str, torch.Tensor]:
    """The first half of the rows, then each again with another value of ``factor`` (``"shape"`` or ``"colour"``)
    that training draws with the row's other attribute (``allowed[shape, colour]``); everything else kept."""
    half = {f: t[: len(t) // 2] for f, t in factors.items()}
    table = allowed if factor == "shape" else allowed.T  # [values of factor, values of the other]
    value, other = half[factor], half["colour" if factor == "shape" else "shape"]
    options = table[:, other].T & (torch.arange(table.shape[0]) != value[:, None])  # [rows, values]
    options = torch.where(options.any(1, keepdim=True), options, torch.arange(table.shape[0]) == value[:, None])
    new = torch.multinomial(options.float(), 1, generator=gen).squeeze(1)
    return {f: torch.cat([t, new if f == factor else t]) for f, t in half.items()}
