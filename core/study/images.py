"""Image studies: two images of an image task (``shapes``), image A the run patched into and image B
the source, and the metrics the serve page's image sweeps use.

An image is named by how the task draws it, so a study file says which image without holding its
pixels: ``{split, seed, n, index}`` is image ``index`` of ``task.sample(n, seed=seed, split=split)``;
with ``factor`` and ``side`` (``"a"`` or ``"b"``) it is the clean (a) or corrupt (b) image of pair
``index`` of ``task.pairs(n, seed=seed, split=split, factor=factor)``. (A draw depends on ``n``,
so ``n`` is part of the name.)

Metrics, each normalised by the study's ``normalize`` option so that 1 is the whole way from A's
output to B's:

* ``closeness`` (a VAE): minus the mean squared distance to image B's reconstruction;
* ``caption_logit_diff`` (a CLIP-style model): the logit of B's caption minus the logit of A's
  (the captions can be given; by default the two images' own).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from ..results.metrics import Metric
from .spec import IMAGE_METRICS, Study, StudyError

__all__ = ["IMAGE_METRICS", "ImagePair", "caption_ids", "draw_image", "image_inputs", "image_metric", "model_kind"]

#: The keys of an image's table, in the order they are written.
IMAGE_KEYS = ("factor", "side", "split", "seed", "n", "index")


def model_kind(model: Any) -> str:
    """``"vae"`` (latents and a reconstruction), ``"clip"`` (two towers scored by similarity) or ``"text"``."""
    families = model.catalog.families
    if "latent.z" in families and "recon" in families:
        return "vae"
    if "image_embed" in families and "text_embed" in families:
        return "clip"
    return "text"


def draw_image(task_name: str, spec: Mapping[str, Any]) -> tuple[torch.Tensor, str]:
    """``([1, 3, H, W] image, caption)`` of the image ``spec`` names (see the module docstring)."""
    from ..zoo.tasks import get_task
    from ..zoo.tasks.base import TaskError

    task = get_task(task_name)
    if not hasattr(task, "sample") or not hasattr(task, "pairs"):
        raise StudyError(f"task {task_name!r} does not draw images; image inputs take task = \"shapes\"")
    split, seed, n, index = spec["split"], spec["seed"], spec["n"], spec["index"]
    try:
        if spec.get("factor") is None:
            batch = task.sample(n, seed=seed, split=split)
        else:
            pairs = task.pairs(n, seed=seed, split=split, factor=spec["factor"])
            batch = pairs.clean if spec["side"] == "a" else pairs.corrupt
    except TaskError as exc:
        raise StudyError(f"[inputs] image {dict(spec)}: {exc}") from None
    return batch.images[index : index + 1], batch.captions[index]


def caption_ids(model: Any, captions: Sequence[str]) -> torch.Tensor:
    """Token ids ``[n, context]`` of captions with a CLIP-style model's tokenizer (open_clip or HuggingFace)."""
    tokenizer = model.tokenizer
    if tokenizer is None:
        raise StudyError("the model has no tokenizer; a CLIP study scores images against captions")
    ids = tokenizer(list(captions))
    if isinstance(ids, torch.Tensor):
        return ids
    context = model.describe().get("text", {}).get("context_length")
    encoded = tokenizer(list(captions), padding="max_length", truncation=True, max_length=context,
                        return_tensors="pt")
    return encoded["input_ids"]


@dataclass
class ImagePair:
    """Image B's inputs (``clean``: the source) and image A's (``corrupt``: the run patched into), as the
    model takes them, a short label and a description of where they come from."""

    clean: dict[str, torch.Tensor]
    corrupt: dict[str, torch.Tensor]
    label: str
    description: str


def image_inputs(study: Study, m: Any) -> ImagePair:
    """The study's image A and image B as the inputs of ``m``: ``{"images"}`` for a VAE,
    ``{"images", "texts"}`` (the two captions) for CLIP."""
    spec = study.inputs
    kind = model_kind(m)
    needs = {"closeness": "vae", "caption_logit_diff": "clip"}[study.metric]
    if kind != needs:
        raise StudyError(f"metric {study.metric!r} is for a {needs.upper()} model, and {study.model!r} is "
                         f"{'a text' if kind == 'text' else 'a ' + kind.upper()} model; image metrics: "
                         f"closeness (VAE), caption_logit_diff (CLIP)")
    a_spec, b_spec = spec.images()
    (a, a_caption), (b, b_caption) = draw_image(spec.task, a_spec), draw_image(spec.task, b_spec)
    clean, corrupt = {"images": b}, {"images": a}
    captions = None
    if kind == "clip":
        captions = list(spec.captions or [a_caption, b_caption])
        if captions[0] == captions[1]:
            raise StudyError(f"a CLIP study compares two different captions (A's and B's); both are {captions[0]!r}: "
                             f"pick images whose captions differ, or give [inputs] captions = [A's, B's]")
        ids = caption_ids(m, captions)
        clean, corrupt = {**clean, "texts": ids}, {**corrupt, "texts": ids}
    label = f"A: {a_caption} <- B: {b_caption}"
    if spec.pair is not None:
        description = (f"the {spec.pair['factor']} pair {_name({**spec.pair, 'factor': None})}: image A ({a_caption!r}) "
                       f"patched from image B ({b_caption!r})")
    else:
        description = f"image A {_name(a_spec)} ({a_caption!r}) patched from image B {_name(b_spec)} ({b_caption!r})"
    if captions is not None:
        description += f"; captions {captions}"
    return ImagePair(clean, corrupt, label, description)


def image_metric(name: str, m: Any, clean: Any) -> Metric:
    """The image metric ``name`` toward the clean run (image B): ``closeness`` runs B once for its
    reconstruction; ``caption_logit_diff`` reads the second caption's logit minus the first's."""
    if name == "closeness":
        with torch.inference_mode():
            target = m.run(clean, {}).output.detach()

        def closeness(output: torch.Tensor, ctx: Any) -> torch.Tensor:
            return -(output - target.to(output)).double().pow(2).flatten(1).mean(1)

        return Metric("closeness to B's reconstruction", closeness)
    if name == "caption_logit_diff":
        return Metric("logit(B's caption) - logit(A's caption)", lambda output, ctx: (output[:, 1] - output[:, 0]).double())
    raise StudyError(f"metric {name!r} is not an image metric; image metrics: {', '.join(IMAGE_METRICS)}")


def _name(spec: Mapping[str, Any]) -> str:
    return "{" + ", ".join(f"{k} {spec[k]}" for k in IMAGE_KEYS if spec.get(k) is not None) + "}"
