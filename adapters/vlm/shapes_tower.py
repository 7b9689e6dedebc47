"""Stage 1 of ``shapes-vlm``: pretrain its CLIP vision tower alone to read shape apart from colour.

LLaVA starts from a pretrained vision tower; ``shapes-vlm`` pretrains its own here, on the ``shapes`` task's
train split, with linear heads on the mean of the patch tokens the language model will read (the last
layer's hidden states without the class token, as LLaVA's ``vision_feature_select_strategy="default"``):

- **shape** on the images as drawn *and* on copies recoloured with random colours (:func:`recolour`), so
  the shape features must work for any colour, not only the colours a shape is drawn with in training;
- **colour** (the training colours) and **x** (left / center / right) on the images as drawn, so the
  features keep what the other questions need.

The random colours avoid each shape's held-out colours (:func:`random_colours`: never a colour whose nearest
named colour is one of them, nor one within ``avoid`` of one), so the tower never sees a blue-ish circle
either: held-out combinations stay unseen in both stages.

:func:`probe_shape` measures what the tower gives: a linear probe of shape on the pooled patch tokens,
fit on train-split images and scored on held-out combinations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .shapes_draw import draw_factors, partners

__all__ = ["TowerRecipe", "TOWER", "optimizer", "pooled_patches", "pretrain_tower", "probe_shape", "random_colours", "recolour"]


@dataclass(frozen=True)
class TowerRecipe:
    """Optimisation of the tower's pretraining (its architecture is the VLM's)."""

    steps: int = 800
    anchors: int = 32  # images per step; each with a shape partner, and both recoloured: 4x rows
    lr: float = 3e-3
    warmup: int = 40
    weight_decay: float = 0.01
    avoid: float = 0.3  # random colours stay this far (RGB distance) from a shape's held-out colours
    avoid_every: bool = False  # random colours avoid every shape's held-out colours, whatever the row's shape
    shape_on_drawn: bool = True  # the shape head also reads the images as drawn (else only recoloured copies)


TOWER = TowerRecipe()


def optimizer(params: list, *, lr: float, weight_decay: float, steps: int, warmup: int):
    """AdamW (weight decay on matrices only) with linear warmup and cosine decay to 2 % of ``lr``:
    ``(optimizer, scheduler)``; both stages of ``shapes-vlm`` train with it."""
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98))
    warmup = min(warmup, max(1, steps // 10))

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * t))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_at)


def pooled_patches(tower, pixel_values: torch.Tensor) -> torch.Tensor:
    """Mean over the patch tokens the VLM reads (last hidden state, class token dropped): ``[rows, width]``."""
    hidden = tower(pixel_values, output_hidden_states=True, return_dict=True).hidden_states[-1]
    return hidden[:, 1:].mean(1)


def random_colours(shapes: torch.Tensor, task, radius: float, gen: torch.Generator) -> torch.Tensor:
    """One random colour per row (``[rows, 3]``, brightest channel 1 as the task's colours) that is not a held-out
    colour of the row's shape: rejected when its nearest named colour of ``task`` is one of them, or when it
    lies within ``radius`` (RGB distance) of one. ``shapes`` is ``[rows]``, or ``[rows, k]`` for a colour that
    must suit k shapes."""
    named = torch.tensor([task.rgb[c] for c in task.colours], dtype=torch.float32)  # [colours, 3]
    held = torch.zeros(len(task.shapes), len(task.colours), dtype=torch.bool)
    for s, c in task.held_out:
        held[task.shapes.index(s), task.colours.index(c)] = True
    n = shapes.shape[0]
    out = torch.empty(n, 3)
    todo = torch.arange(n)
    while todo.numel():
        c = torch.rand(todo.numel(), 3, generator=gen)
        c = c / c.amax(1, keepdim=True).clamp(min=1e-6)
        dist = torch.cdist(c, named)  # [rows, colours]
        rows_held = held[shapes[todo]]
        if rows_held.ndim == 3:
            rows_held = rows_held.any(1)
        nearest_held = rows_held.gather(1, dist.argmin(1, keepdim=True)).squeeze(1)
        near = ((dist < radius) & rows_held).any(1)
        ok = ~(nearest_held | near)
        out[todo[ok]] = c[ok]
        todo = todo[~ok]
    return out


def recolour(images: torch.Tensor, colours: torch.Tensor) -> torch.Tensor:
    """The same shapes in other colours: every task colour has a channel at 1, so the brightest channel is the
    shape's coverage, which is multiplied by the new colour."""
    return images.amax(1, keepdim=True) * colours[:, :, None, None]


def pretrain_tower(tower, task, pool: dict[str, torch.Tensor], allowed: torch.Tensor, gen: torch.Generator,
                   recipe: TowerRecipe = TOWER, *, progress: bool | None = False) -> dict[str, Any]:
    """Train ``tower`` (a ``CLIPVisionModel``, in place) with shape / colour / x heads; the heads are dropped.
    ``pool`` holds train-split factors to draw anchors from, ``allowed[shape, colour]`` the training
    combinations (for shape partners). Returns the losses per step."""
    import torch.nn.functional as F

    from crosspatch.progress import progress_bar

    width = tower.config.hidden_size
    heads = torch.nn.ModuleDict({
        "shape": torch.nn.Linear(width, task.sizes["shape"]),
        "colour": torch.nn.Linear(width, task.sizes["colour"]),
        "x": torch.nn.Linear(width, task.sizes["x"]),
    })
    params = [p for p in tower.parameters() if p.requires_grad] + list(heads.parameters())
    steps = recipe.steps
    opt, sched = optimizer(params, lr=recipe.lr, weight_decay=recipe.weight_decay, steps=steps, warmup=recipe.warmup)
    n_pool = next(iter(pool.values())).shape[0]
    losses = []
    tower.train()
    for _ in progress_bar(range(steps), progress, desc=f"pretraining the vision tower ({steps} steps)"):
        rows = torch.randint(n_pool, (2 * recipe.anchors,), generator=gen)
        factors = partners({f: t[rows] for f, t in pool.items()}, allowed, gen)
        images = task.render(factors)
        shapes = factors["shape"]
        which = torch.arange(len(task.shapes)).expand(len(shapes), -1) if recipe.avoid_every else shapes
        again = recolour(images, random_colours(which, task, recipe.avoid, gen))
        feats = pooled_patches(tower, torch.cat([images, again]))
        drawn, recoloured = feats[: len(images)], feats[len(images):]
        shape_feats, shape_labels = (feats, torch.cat([shapes, shapes])) if recipe.shape_on_drawn else (recoloured, shapes)
        loss = (F.cross_entropy(heads["shape"](shape_feats), shape_labels)
                + F.cross_entropy(heads["colour"](drawn), factors["colour"])
                + F.cross_entropy(heads["x"](feats), torch.cat([factors["x"], factors["x"]])))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    tower.eval()
    heads.eval()
    return {"tower_steps": steps, "tower_losses": losses, "heads": heads}


def _features(tower, task, n: int, split: str, gen: torch.Generator, recipe) -> tuple[torch.Tensor, torch.Tensor]:
    factors = draw_factors(task, n, split, gen, recipe)
    with torch.inference_mode():
        feats = pooled_patches(tower, task.render(factors))
    return feats, factors["shape"]


def probe_shape(tower, recipe, *, n: int = 2000, seed: int = 0) -> dict[str, float]:
    """A linear probe of shape on :func:`pooled_patches`, fit on ``n`` train-split images of the default task and
    scored on ``n`` more of each split: ``{"probe_train": ..., "probe_test": ...}`` (test: held-out combinations)."""
    from sklearn.linear_model import LogisticRegression

    from crosspatch.zoo.tasks.shapes import ShapesTask

    task = ShapesTask(size=recipe.image_size)
    gen = torch.Generator().manual_seed(20_000 + seed)
    fit_x, fit_y = _features(tower, task, n, "train", gen, recipe)
    clf = LogisticRegression(max_iter=2000).fit(fit_x.numpy(), fit_y.numpy())
    out = {}
    for split in ("train", "test"):
        x, y = _features(tower, task, n, split, gen, recipe)
        out[f"probe_{split}"] = float((torch.from_numpy(clf.predict(x.numpy())) == y).float().mean())
    return out
