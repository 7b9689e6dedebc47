"""Zoo model ``shapes-vlm``: a tiny LLaVA trained here to answer questions about shapes images.

    from crosspatch import zoo
    loaded = zoo.load("shapes-vlm")           # trains on first use (a few minutes on a CPU), then reloads
    loaded.model, loaded.tokenizer, loaded.info["accuracy"]

**Model.** ``LlavaForConditionalGeneration`` built from a config: a CLIP vision tower on 32 x 32 images
(8 x 8 patches: a class token and 16 patch tokens; the class token is dropped, so 16 image tokens), LLaVA's
two-layer GELU projector, and a Llama language model (see :class:`Recipe`). The tokenizer is word-level
(:func:`~.shapes_questions.shapes_tokenizer`), built here; nothing is downloaded.

**Training, in two stages** (as LLaVA: a pretrained vision tower, then the projector and language model).

1. *The tower alone* (:mod:`.shapes_tower`, ``tower_steps`` = 800): linear heads for shape, colour and x on
   the mean of the patch tokens the language model reads; the shape head also sees every image recoloured
   with a random colour, so the tower's shape features must hold for any colour. Then the tower is frozen.
2. *Projector and language model*: three questions with one-word answers (:mod:`.shapes_questions`): the
   colour, the shape, and whether the shape is on the left (half the rows of that question show a shape on
   the left). A batch is 96 rows, a third for each question; the shape question's rows come in pairs that
   differ only in the shape (``shape_pairs``), and half of those pairs are recoloured with a random colour
   (``recolour_shape``). The loss is the cross-entropy of the answer at the last token (as in LLaVA's
   instruction tuning, the prompt itself is not a target). 1200 steps.

Both stages use AdamW with warmup and cosine decay, one thread, and one seed: the same seed gives the same
weights. Images are :class:`~crosspatch.zoo.tasks.shapes.ShapesTask` images as they are (floats in [0, 1], no
normalisation). The patch embedding is designed and frozen (``colour_filters``): 48 filters apply one random
kernel to all three channels alike (shape, no hue), 16 read the mean of one channel (colour, no shape) at a
tenth of their strength (``colour_filter_scale``): at full strength the tower's shape features depended on
colour, and blue circles were read as squares.

**Held-out images.** Training draws the task's ``"train"`` split, with three extra colours (white, orange,
purple) drawn with every shape; evaluation draws the ``"test"`` split: the 8 shape-colour combinations never
drawn in training (blue and magenta circles, yellow and cyan squares, ...), so every evaluation image is new
to the model. The random colours keep to that: a shape is never recoloured with a colour whose nearest named
colour is one it is held out with, nor within ``avoid`` (0.3, RGB distance) of one, so no stage ever sees a
blue-ish circle. ``accuracy`` is the mean over the three questions on 600 held-out images each;
``accuracy_<question>`` per question; ``train_accuracy*`` the same on train-split images.

**What it learns, measured**: docs/vlm.md has the numbers of this recipe and of the recipes before it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Iterator

import torch

from crosspatch.zoo.store import Loaded, TrainSettings, ZooModel

from .shapes_draw import draw_factors, partners
from .shapes_questions import QUESTIONS, shapes_prompts, shapes_tokenizer
from .shapes_tower import TOWER, optimizer, pretrain_tower, random_colours, recolour

__all__ = ["RECIPE", "Recipe", "ZOO_MODELS", "build_shapes_vlm", "draw_factors", "evaluate", "load_shapes_vlm",
           "model_config", "questions_batch", "save_trained", "training_task", "train"]

logger = logging.getLogger(__name__)

NAME = "shapes-vlm"


@dataclass(frozen=True)
class Recipe:
    """Architecture and optimisation of ``shapes-vlm``."""

    image_size: int = 32
    patch_size: int = 8
    vision_width: int = 64
    vision_layers: int = 2
    vision_heads: int = 4
    text_width: int = 64
    text_layers: int = 8
    text_heads: int = 4
    text_kv_heads: int = 2
    steps: int = 1200
    batch_size: int = 96  # rows per step, a third per question
    lr: float = 3e-3
    warmup: int = 100
    weight_decay: float = 0.01
    pool: int = 20_000  # train images rendered once; batches draw from them
    extra_colours: tuple[str, ...] = ("white", "orange", "purple")  # drawn with every shape in training only
    colour_filters: int = 16  # > 0: a designed, frozen patch embedding (see _colour_blind_patches)
    colour_filter_scale: float = 0.1  # the colour filters' weight against the shape filters' (1: equal)
    shape_pairs: bool = True  # the shape question's rows come in pairs that differ only in the shape
    colour_pairs: bool = False  # the colour question's rows come in pairs that differ only in the colour
    held_out: str = "combinations"  # what evaluation images hold that training never draws: or "scale"
    held_out_scale: str = "medium"
    question_rows: tuple[int, ...] = (1, 1, 1)  # shares of the batch for the colour, shape and left questions
    eval_images: int = 600  # per question and split
    tower_steps: int = 800  # > 0: pretrain the vision tower alone first (shapes_tower); 0: train it with the rest
    freeze_tower: bool = True  # after pretraining, the tower keeps its weights (only projector and LM train)
    recolour_shape: float = 0.5  # share of the shape question's rows recoloured with random colours
    avoid: float = 0.3  # random colours stay this far from (and never nearest to) a shape's held-out colours


RECIPE = Recipe()


def training_task(recipe: Recipe = RECIPE):
    """The task training draws from: the default :class:`ShapesTask`, plus ``recipe.extra_colours`` (which occur
    with every shape), keeping the default task's held-out combinations."""
    from crosspatch.zoo.tasks.shapes import ShapesTask

    task = ShapesTask(size=recipe.image_size)
    if not recipe.extra_colours:
        return task
    return ShapesTask(size=recipe.image_size, colours=task.colours + tuple(recipe.extra_colours), held_out=task.held_out)


def model_config(tokenizer, recipe: Recipe = RECIPE):
    """The ``LlavaConfig`` of ``shapes-vlm`` for this tokenizer."""
    import transformers as T

    vision = T.CLIPVisionConfig(
        hidden_size=recipe.vision_width, intermediate_size=2 * recipe.vision_width,
        num_hidden_layers=recipe.vision_layers, num_attention_heads=recipe.vision_heads,
        image_size=recipe.image_size, patch_size=recipe.patch_size, projection_dim=recipe.vision_width,
    )
    text = T.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=recipe.text_width, intermediate_size=2 * recipe.text_width,
        num_hidden_layers=recipe.text_layers, num_attention_heads=recipe.text_heads,
        num_key_value_heads=recipe.text_kv_heads, max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    return T.LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1, vision_feature_select_strategy="default", projector_hidden_act="gelu",
    )


def image_tokens(recipe: Recipe = RECIPE) -> int:
    return (recipe.image_size // recipe.patch_size) ** 2


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[torch.Generator]:
    """Seeded weights and one intra-op thread, leaving the caller's random state and threads alone; yields the
    data generator."""
    threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_num_threads(1)
        try:
            yield torch.Generator().manual_seed(seed + 7919)
        finally:
            torch.set_num_threads(threads)


def questions_batch(task, factors: dict[str, torch.Tensor], question: str, gen: torch.Generator):
    """The task's batch for these factors; for ``left``, half the rows moved to the left (the rest off it)."""
    if question == "left":
        n = factors["x"].shape[0]
        left = torch.rand(n, generator=gen) < 0.5
        other = 1 + torch.randint(task.sizes["x"] - 1, (n,), generator=gen)  # center or right
        factors = {**factors, "x": torch.where(left, torch.zeros_like(other), other)}
    return task.batch(factors)


def _batch(tokenizer, task, recipe: Recipe, factors_per_q: dict[str, dict], gen) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """One right-padded batch over the three questions: inputs, answer ids, last-token index per row."""
    parts = []
    for q, factors in factors_per_q.items():
        batch = questions_batch(task, factors, q, gen)
        parts.append(shapes_prompts(tokenizer, batch.images, batch.values, q, image_tokens(recipe), task))
    width = max(p.inputs["input_ids"].shape[1] for p in parts)
    ids, mask, last = [], [], []
    for p in parts:
        x = p.inputs["input_ids"]
        pad = width - x.shape[1]
        ids.append(torch.nn.functional.pad(x, (0, pad), value=tokenizer.pad_token_id))
        mask.append(torch.nn.functional.pad(torch.ones_like(x), (0, pad)))
        last.append(torch.full((x.shape[0],), x.shape[1] - 1))
    inputs = {"input_ids": torch.cat(ids), "attention_mask": torch.cat(mask),
              "pixel_values": torch.cat([p.inputs["pixel_values"] for p in parts])}
    return inputs, torch.cat([p.answer for p in parts]), torch.cat(last)


def _colour_blind_patches(model, colour_filters: int, colour_scale: float = 1.0) -> None:
    """Freeze the patch embedding as filters that see shape apart from colour: ``colour_filters`` filters take the
    mean of one channel over the patch (colour, no shape), ``colour_scale`` times as strong as the others, which
    apply one random kernel to all three channels alike (shape, no hue)."""
    conv = model.model.vision_tower.embeddings.patch_embedding
    with torch.no_grad():
        w = conv.weight  # [width, 3, p, p]
        shared = w[:, :1].expand_as(w).clone()
        scale = float(w[:, 0].std()) * math.sqrt(3) * colour_scale
        for i in range(colour_filters):
            shared[i] = 0.0
            shared[i, i % 3] = scale if (i // 3) % 2 == 0 else -scale
        w.copy_(shared)
    conv.weight.requires_grad_(False)


def _recolour_shape_rows(inputs: dict, factors: dict, per_q: dict[str, int], task, recipe: Recipe, gen) -> None:
    """Recolour a ``recolour_shape`` share of the shape question's rows (in place) with random colours that are
    never a held-out colour of the row's shape (:func:`.shapes_tower.random_colours`). With ``shape_pairs`` both
    rows of a pair get the same colour, so they still differ only in the shape."""
    names = list(QUESTIONS)
    offset = sum(per_q[q] for q in names[: names.index("shape")])
    shapes = factors["shape"]["shape"]
    n = shapes.shape[0]
    pixels = inputs["pixel_values"]
    if recipe.shape_pairs:
        half = n // 2
        k = int(round(half * recipe.recolour_shape))
        colours = random_colours(torch.stack([shapes[:k], shapes[half: half + k]], 1), task, recipe.avoid, gen)
        for start in (offset, offset + half):
            pixels[start: start + k] = recolour(pixels[start: start + k], colours)
    else:
        k = int(round(n * recipe.recolour_shape))
        pixels[offset: offset + k] = recolour(pixels[offset: offset + k], random_colours(shapes[:k], task, recipe.avoid, gen))


def train(recipe: Recipe = RECIPE, *, seed: int = 0, steps: int | None = None, progress: bool | None = None):
    """Train ``shapes-vlm``; returns ``(model, tokenizer, record)`` (record: steps, seconds, losses)."""
    import torch.nn.functional as F
    import transformers as T

    from crosspatch.progress import progress_bar

    steps = recipe.steps if steps is None else steps
    task = training_task(recipe)
    tokenizer = shapes_tokenizer(task)
    with _seeded(seed) as gen:
        model = T.LlavaForConditionalGeneration(model_config(tokenizer, recipe))
        if recipe.colour_filters:
            _colour_blind_patches(model, recipe.colour_filters, recipe.colour_filter_scale)
        pool = draw_factors(task, recipe.pool, "train", gen, recipe)
        allowed = torch.zeros(task.sizes["shape"], task.sizes["colour"], dtype=torch.bool)
        combos = task.combinations("train") + (task.combinations("test") if recipe.held_out == "scale" else [])
        allowed[tuple(torch.tensor(combos).T)] = True
        cpu_start, start = time.process_time(), time.perf_counter()
        tower_record: dict[str, Any] = {}
        if recipe.tower_steps:
            tower = model.model.vision_tower
            tower_record = pretrain_tower(tower, task, pool, allowed, gen,
                                          replace(TOWER, steps=recipe.tower_steps, avoid=recipe.avoid),
                                          progress=progress)
            tower_record.pop("heads")
            tower_record["tower_seconds"] = round(time.perf_counter() - start, 2)
            tower_record["tower_cpu_seconds"] = round(time.process_time() - cpu_start, 2)
            if recipe.freeze_tower:
                tower.requires_grad_(False)
        trainable = [p for p in model.parameters() if p.requires_grad]
        opt, sched = optimizer(trainable, lr=recipe.lr, weight_decay=recipe.weight_decay, steps=steps,
                               warmup=recipe.warmup)
        shares = dict(zip(QUESTIONS, recipe.question_rows))
        per_q = {q: recipe.batch_size * k // sum(shares.values()) for q, k in shares.items()}
        losses = []
        model.train()
        if recipe.tower_steps and recipe.freeze_tower:
            model.model.vision_tower.eval()
        lm_cpu_start, lm_start = time.process_time(), time.perf_counter()
        for step in progress_bar(range(steps), progress, desc=f"training {NAME} ({steps} steps)"):
            factors = {}
            for q in QUESTIONS:
                rows = torch.randint(recipe.pool, (per_q[q],), generator=gen)
                factors[q] = {f: t[rows] for f, t in pool.items()}
                if q == "shape" and recipe.shape_pairs:
                    factors[q] = partners(factors[q], allowed, gen, "shape")
                if q == "colour" and recipe.colour_pairs:
                    factors[q] = partners(factors[q], allowed, gen, "colour")
            inputs, answer, last = _batch(tokenizer, task, recipe, factors, gen)
            if recipe.recolour_shape:
                _recolour_shape_rows(inputs, factors, per_q, task, recipe, gen)
            logits = model(**inputs, use_cache=False).logits
            loss = F.cross_entropy(logits[torch.arange(len(answer)), last], answer)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
            if logger.isEnabledFor(logging.DEBUG) and step % 100 == 0:
                logger.debug("step %d loss %.4f", step, losses[-1])
        end, cpu_end = time.perf_counter(), time.process_time()
    model.eval()
    return model, tokenizer, {"steps": steps, "train_seconds": round(end - start, 2),
                              "train_cpu_seconds": round(cpu_end - cpu_start, 2),
                              "lm_seconds_per_step": round((end - lm_start) / max(1, steps), 4),
                              "lm_cpu_seconds_per_step": round((cpu_end - lm_cpu_start) / max(1, steps), 4),
                              "losses": losses, **tower_record}


def evaluate(model, tokenizer, recipe: Recipe = RECIPE, *, seed: int = 0, n: int | None = None) -> dict[str, float]:
    """Accuracy per question on the default task's ``test`` split (held-out combinations) and ``train`` split:
    the answer is the top token over the whole vocabulary at the last position."""
    from crosspatch.zoo.tasks.shapes import ShapesTask

    task = ShapesTask(size=recipe.image_size)  # evaluation never draws the extra colours
    n = recipe.eval_images if n is None else n
    gen = torch.Generator().manual_seed(10_000 + seed)
    out: dict[str, float] = {}
    for split, prefix in (("test", ""), ("train", "train_")):
        accs = []
        for q in QUESTIONS:
            batch = questions_batch(task, draw_factors(task, n, split, gen, recipe), q, gen)
            prompts = shapes_prompts(tokenizer, batch.images, batch.values, q, image_tokens(recipe), task)
            with torch.inference_mode():
                logits = model(**prompts.inputs, use_cache=False).logits[:, -1]
            acc = float((logits.argmax(-1) == prompts.answer).float().mean())
            out[f"{prefix}accuracy_{q}"] = acc
            accs.append(acc)
        out[f"{prefix}accuracy"] = sum(accs) / len(accs)
    return out


def _quiet():
    from crosspatch.adapters.transformers.zoo import _quiet_transformers

    return _quiet_transformers()


def build_shapes_vlm(folder: Path, settings: TrainSettings, recipe: Recipe | None = None) -> dict[str, Any]:
    """Train ``shapes-vlm`` into ``folder``; metrics on held-out (shape, colour) combinations."""
    recipe = RECIPE if recipe is None else recipe
    model, tokenizer, record = train(recipe, seed=settings.seed, steps=settings.steps, progress=settings.progress)
    return save_trained(folder, model, tokenizer, record, recipe, seed=settings.seed)


def save_trained(folder: Path, model, tokenizer, record: dict[str, Any], recipe: Recipe = RECIPE, *,
                 seed: int = 0) -> dict[str, Any]:
    """Evaluate a model :func:`train` returned, write it and its tokenizer into ``folder``; the build's metrics."""
    metrics: dict[str, Any] = {"task": "shapes", **evaluate(model, tokenizer, recipe, seed=seed)}
    record = dict(record)
    losses = record.pop("losses")
    k = max(1, min(20, len(losses) // 5))  # steps averaged at each end of training
    tower_losses = record.pop("tower_losses", [])
    if tower_losses:
        t = max(1, min(20, len(tower_losses) // 5))
        record.update(tower_loss_first=round(sum(tower_losses[:t]) / t, 4),
                      tower_loss_last=round(sum(tower_losses[-t:]) / t, 4))
    with _quiet():
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    metrics.update({
        "accuracy_means": "the answer word is the top token at the last position; accuracy: mean over the questions "
                          "colour, shape, left on the test split (held-out shape-colour combinations)",
        "eval_images": recipe.eval_images, "questions": {q.name: q.text for q in QUESTIONS.values()},
        "parameters": sum(p.numel() for p in model.parameters()), "recipe": asdict(recipe),
        "loss_first": round(sum(losses[:k]) / k, 4), "loss_last": round(sum(losses[-k:]) / k, 4),
        "loss_window": k, **record,
    })
    return metrics


def load_shapes_vlm(folder: Path | None) -> Loaded:
    """A ``shapes-vlm`` folder -> ``Loaded`` (``LlavaForConditionalGeneration`` in eval mode and its tokenizer)."""
    from transformers import LlavaForConditionalGeneration, PreTrainedTokenizerFast

    if folder is None:
        raise ValueError("shapes-vlm loads from the folder its build wrote")
    with _quiet():
        model = LlavaForConditionalGeneration.from_pretrained(folder, local_files_only=True).eval()
        tokenizer = PreTrainedTokenizerFast.from_pretrained(folder, local_files_only=True)
    return Loaded(model, tokenizer, {})


ZOO_MODELS: list[ZooModel] = [
    ZooModel(
        name=NAME,
        description="tiny LLaVA (CLIP tower pretrained here and frozen, 8-layer Llama, d_model 64) trained here to "
                    "answer colour, shape and left questions about shapes images; tested on held-out shape-colour "
                    "combinations",
        adapter="vlm",
        task="shapes",
        build=build_shapes_vlm,
        load=load_shapes_vlm,
        version="2",
    ),
]
