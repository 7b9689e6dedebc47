"""Zoo models of the transformers adapter: tiny GPT-2s trained here on the project's text tasks.

``ioi-gpt2-tiny``
    GPT-2 architecture (2 layers, 4 heads, d_model 64, 112k parameters) with a word-level
    tokenizer, trained on IOI prompts of the task's *train* names; measured on prompts made only of
    its held-out *test* names.
``ioi-gpt2-6x16``
    The IOI recipe at a size where a sweep is worth sparing: 6 layers, 16 heads, d_model 128 (1.2M
    parameters, 2-4 minutes on one core). Its (head, position) sweep is about 500 forwards, so a
    method that estimates before it patches (``cp.localize``) can be measured against it; on the
    2-layer model the estimates alone are 15 % of the sweep. Held-out top-name accuracy 0.998 with the
    default seed 0, but not steady across seeds: 0.795 and 0.950 with seeds 1 and 2 (0.98 and 0.99
    against the distractor). Deeper or wider recipes tried (8 x 16 x 128, 8 x 16 x 256) learnt the
    training names better than the held-out ones (0.90 and 0.23 of held-out prompts at 800 steps).
``greater-than-tiny``
    The same recipe on greater-than prompts; measured on held-out start years.

How training works, and why:

* **Word-level tokenizer.** ``tokenizers`` WordLevel over the task's ``vocabulary()`` (plus the
  filler words below and the specials), pre-tokenized by ``Whitespace`` and then digit pairs, so
  every name and every two-digit number is exactly one token. Saved with ``save_pretrained``; it
  loads back with ``PreTrainedTokenizerFast.from_pretrained``.
* **Full language-model loss** on every position, not only on the answer: the model predicts the
  template words too, so its activations mean something at every position (patching sweeps run
  over all of them), as in a real LM. The answer position weighs 4x so the task itself is learnt
  in few steps.
* **Held-out names.** A name that never occurs in training keeps its random initial embedding, and
  no circuit can copy it. So every name, train and test, also occurs in simple *filler* sentences
  that are not IOI prompts ("Mary has a book, and Mary likes it."): their embeddings are trained,
  and the model learns to move names around in general. IOI prompts in training use only train
  names. That alone is not enough (measured: 1-75% held-out top-1): the softmax on IOI prompts
  then teaches "a test name is never the answer here" - a fact of the training set, not of IOI -
  and the model learns a train-name bias that beats the copied test name. So on IOI prompts the
  loss is a softmax over the vocabulary *without* the test names: IOI training says nothing about
  them, neither as answers nor as wrong answers. Then the rule generalises (100% held-out).
  The greater-than model needs neither: held-out start years occur as end years in training;
  only their use as a start is new.
* **Seeded and deterministic on CPU**: ``torch.manual_seed`` (inside ``torch.random.fork_rng``, so
  the caller's random state is untouched) for the initialisation, a seeded ``random.Random`` for the
  data, and one intra-op thread while training (faster for models this small, and the weights do not
  depend on the caller's thread setting): the same seed gives the same weights.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from crosspatch.zoo.store import Loaded, TrainSettings, ZooModel

__all__ = ["GREATER_THAN_RECIPE", "IOI_6X16_RECIPE", "IOI_RECIPE", "Recipe", "ZOO_MODELS", "load_gpt2", "word_tokenizer"]

logger = logging.getLogger(__name__)

SPECIALS = ("<|endoftext|>", "<unk>", "<pad>")


# ------------------------------------------------------------------ shared pieces


def word_tokenizer(vocabulary: Sequence[str]):
    """A word-level ``PreTrainedTokenizerFast``: ``Whitespace`` pre-tokenizer, then digit pairs
    (``"1732"`` -> ``"17"``, ``"32"``, like :func:`crosspatch.tasks.words`), one token per word of
    ``vocabulary`` plus the specials ``<|endoftext|>`` (bos/eos), ``<unk>`` and ``<pad>``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = list(SPECIALS) + sorted(set(vocabulary) - set(SPECIALS))
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Split(Regex(r"\d\d"), behavior="isolated")]
    )
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces, tidies " ,"
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<|endoftext|>",
        eos_token="<|endoftext|>", model_max_length=64,
    )


@dataclass(frozen=True)
class Recipe:
    """Architecture and optimisation of one zoo model."""

    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64
    steps: int = 1000
    batch_size: int = 64
    lr: float = 3e-3
    warmup: int = 50
    weight_decay: float = 0.01
    answer_weight: float = 4.0  # weight of the answer position in the loss (the others weigh 1)
    filler_fraction: float = 0.0  # share of each batch that is filler sentences
    hide_unseen: bool = False  # leave the held-out tokens out of the softmax on task prompts
    eval_prompts: int = 1000


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No "Writing model shards" / "Loading weights" bars for files this small."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    if was:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _gpt2(tokenizer, recipe: Recipe, n_positions: int = 32):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=n_positions, n_embd=recipe.n_embd, n_layer=recipe.n_layer,
        n_head=recipe.n_head, n_inner=4 * recipe.n_embd, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return GPT2LMHeadModel(config)


def _encode(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    return [e.ids for e in tokenizer.backend_tokenizer.encode_batch(list(texts), add_special_tokens=False)]


@dataclass
class _Batch:
    ids: Any  # [batch, pos] right-padded
    weight: Any  # [batch, pos - 1] loss weight of predicting ids[:, 1:]; 0 on padding
    penalty: Any = None  # added to the logits before the loss ([batch, 1, vocab]) or None


def _batch(rows: list[list[int]], is_task: list[bool], pad_id: int, answer_weight: float) -> _Batch:
    """Right-padded ids and loss weights; the last token of a task row is its answer."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    weight = torch.zeros(len(rows), width - 1)
    for i, (row, task_row) in enumerate(zip(rows, is_task)):
        ids[i, : len(row)] = torch.tensor(row)
        weight[i, : len(row) - 1] = 1.0
        if task_row:
            weight[i, len(row) - 2] = answer_weight
    return _Batch(ids, weight)


def _train(model, next_batch: Callable[[int], _Batch], recipe: Recipe, steps: int, progress: bool | None) -> float:
    """AdamW, linear warmup then cosine decay, on a weighted next-token loss; returns seconds."""
    import torch
    import torch.nn.functional as F

    from crosspatch.progress import progress_bar

    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe.lr, betas=(0.9, 0.98),
    )

    def lr_at(step: int) -> float:
        if step < recipe.warmup:
            return (step + 1) / recipe.warmup
        t = (step - recipe.warmup) / max(1, steps - recipe.warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    start = time.perf_counter()
    for step in progress_bar(range(steps), progress, desc=f"training ({steps} steps)"):
        b = next_batch(step)
        mask = (b.ids != model.config.pad_token_id).long()  # right padding: only silences a warning
        logits = model(input_ids=b.ids, attention_mask=mask, use_cache=False).logits[:, :-1]
        if b.penalty is not None:
            logits = logits + b.penalty
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), b.ids[:, 1:].reshape(-1), reduction="none")
        loss = (loss * b.weight.reshape(-1)).sum() / b.weight.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if logger.isEnabledFor(logging.DEBUG) and step % 100 == 0:
            logger.debug("step %d loss %.4f", step, loss.item())
    model.eval()
    return time.perf_counter() - start


def _save(folder: Path, model, tokenizer) -> None:
    with _quiet_transformers():
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)


def load_gpt2(folder: Path | None) -> Loaded:
    """A zoo GPT-2 folder -> ``Loaded`` (``GPT2LMHeadModel`` in eval mode and its tokenizer)."""
    from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast

    if folder is None:
        raise ValueError("zoo GPT-2 models load from the folder their build wrote")
    with _quiet_transformers():
        model = GPT2LMHeadModel.from_pretrained(folder, local_files_only=True).eval()
        tokenizer = PreTrainedTokenizerFast.from_pretrained(folder, local_files_only=True)
    return Loaded(model, tokenizer, {})


def _training_record(recipe, model, steps: int, seconds: float) -> dict[str, Any]:
    """What every zoo model's manifest records about its training."""
    return {
        "steps": steps,
        "batch_size": recipe.batch_size,
        "train_seconds": round(seconds, 2),
        "parameters": _n_params(model),
        "architecture": _arch(recipe),
    }


def _n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())  # tied embeddings are one parameter


def _last_logits(model, ids):
    import torch

    with torch.inference_mode():
        return model(input_ids=ids, use_cache=False).logits[:, -1].float()


@contextlib.contextmanager
def _seeded(seed: int, name: str) -> Iterator[random.Random]:
    """``torch.manual_seed(seed)`` and one intra-op thread, without touching the caller's random
    state or thread count; yields the data RNG.

    One thread: the models are so small that a second thread only adds spin-waits (measured 7x
    slower per step on a busy 2-core machine), and the weights then do not depend on the caller's
    thread setting.
    """
    import torch

    threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_num_threads(1)
        try:
            yield random.Random(f"{name}/{seed}")
        finally:
            torch.set_num_threads(threads)


def _arch(recipe: Recipe) -> dict[str, int]:
    return {"n_layer": recipe.n_layer, "n_head": recipe.n_head, "n_embd": recipe.n_embd}


# ------------------------------------------------------------------ IOI

IOI_RECIPE = Recipe(steps=800, lr=5e-3, filler_fraction=0.25, hide_unseen=True)
IOI_6X16_RECIPE = Recipe(n_layer=6, n_head=16, n_embd=128, steps=800, lr=5e-3, filler_fraction=0.25,
                         hide_unseen=True)

#: Non-IOI sentences in which every name (train and test) occurs; ``{x}`` is one name.
IOI_FILLER: tuple[str, ...] = (
    "{x} has a {object}, and {x} likes it.",
    "{x} went to the {place}, and then {x} went home.",
    "The {object} at the {place} was for {x}, so it was given to {x}.",
    "{x} went to the {place}.",
)


def ioi_filler(rng: random.Random, n: int) -> list[str]:
    """``n`` filler sentences, each about one name drawn from all names (train and test)."""
    from crosspatch.zoo.tasks.ioi import NAMES, OBJECTS, PLACES

    return [
        rng.choice(IOI_FILLER).format(x=rng.choice(NAMES), object=rng.choice(OBJECTS), place=rng.choice(PLACES))
        for _ in range(n)
    ]


def ioi_vocabulary() -> list[str]:
    """The IOI task's vocabulary plus the filler's words."""
    from crosspatch.zoo.tasks import IOITask, words

    vocab = set(IOITask().vocabulary())
    for fmt in IOI_FILLER:
        vocab.update(words(fmt.format(x="", object="", place="")))
    return sorted(vocab)


def build_ioi(folder: Path, settings: TrainSettings, recipe: Recipe = IOI_RECIPE,
              name: str = "ioi-gpt2-tiny") -> dict[str, Any]:
    """Train the IOI model ``name`` with ``recipe`` into ``folder``; metrics on prompts of held-out (test) names."""
    import torch

    from crosspatch.zoo.tasks import IOITask, tokenize_pairs
    from crosspatch.zoo.tasks.ioi import NAMES, TEST_NAMES

    task = IOITask()
    steps = settings.steps if settings.steps is not None else recipe.steps
    n_filler = round(recipe.batch_size * recipe.filler_fraction)
    n_task = recipe.batch_size - n_filler
    with _seeded(settings.seed, name) as rng:
        tokenizer = word_tokenizer(ioi_vocabulary())
        model = _gpt2(tokenizer, recipe)
        penalty = None
        if recipe.hide_unseen:
            penalty = torch.zeros(recipe.batch_size, 1, len(tokenizer))
            penalty[:n_task, 0, tokenizer.convert_tokens_to_ids(list(TEST_NAMES))] = -1e4

        def next_batch(step: int) -> _Batch:
            pairs = task.pairs(n_task, seed=rng.randrange(2**62), split="train")
            texts = [f"{p.clean}{p.answer_prefix}{p.answer}" for p in pairs] + ioi_filler(rng, n_filler)
            b = _batch(_encode(tokenizer, texts), [True] * n_task + [False] * n_filler,
                       tokenizer.pad_token_id, recipe.answer_weight)
            b.penalty = penalty
            return b

        seconds = _train(model, next_batch, recipe, steps, settings.progress)

    names = torch.tensor(tokenizer.convert_tokens_to_ids(list(NAMES)))
    metrics: dict[str, Any] = {"task": "ioi"}
    for split, prefix in (("test", ""), ("train", "train_")):
        data = tokenize_pairs(task.pairs(recipe.eval_prompts, seed=10_000 + settings.seed, split=split), tokenizer)
        logits = _last_logits(model, data.clean)
        rows = torch.arange(len(data))
        diff = logits[rows, data.answer] - logits[rows, data.distractor]
        metrics[f"{prefix}accuracy"] = float((names[logits[:, names].argmax(-1)] == data.answer).float().mean())
        metrics[f"{prefix}accuracy_vocab"] = float((logits.argmax(-1) == data.answer).float().mean())
        metrics[f"{prefix}accuracy_vs_distractor"] = float((diff > 0).float().mean())
        metrics[f"{prefix}logit_diff"] = float(diff.mean())
    _save(folder, model, tokenizer)
    metrics.update({
        "accuracy_means": "answer is the top name (among all names); _vocab: top token; _vs_distractor: IO > S",
        "eval_prompts": recipe.eval_prompts,
        "eval_split": "test: prompts of held-out names only",
        **_training_record(recipe, model, steps, seconds),
    })
    return metrics


# ------------------------------------------------------------------ greater-than

GREATER_THAN_RECIPE = Recipe(steps=800)


def greater_than_sentences(rng: random.Random, n: int, starts: Sequence[int]) -> list[str]:
    """Complete sentences "The war lasted from the year 1732 to the year 1755 ." with the end year
    drawn uniformly above the start."""
    from crosspatch.zoo.tasks.greater_than import CENTURIES, NOUNS, TEMPLATES

    out = []
    for _ in range(n):
        start = rng.choice(starts)
        prompt = rng.choice(TEMPLATES).format(noun=rng.choice(NOUNS), century=rng.choice(CENTURIES),
                                              start=f"{start:02d}")
        out.append(f"{prompt}{rng.randint(start + 1, 99):02d} .")
    return out


def build_greater_than(folder: Path, settings: TrainSettings, recipe: Recipe = GREATER_THAN_RECIPE) -> dict[str, Any]:
    """Train ``greater-than-tiny`` into ``folder``; metrics on prompts of held-out start years.

    Training starts are the train split's years plus 01, the corruption's start, so corrupted
    prompts are in distribution too.
    """
    import torch

    from crosspatch.zoo.tasks import GreaterThanTask, greater_than_metric, tokenize_pairs
    from crosspatch.zoo.tasks.greater_than import CORRUPT_START

    task = GreaterThanTask()
    steps = settings.steps if settings.steps is not None else recipe.steps
    starts = (CORRUPT_START, *task.start_years("train"))
    with _seeded(settings.seed, "greater-than-tiny") as rng:
        tokenizer = word_tokenizer(sorted(set(task.vocabulary()) | {"."}))
        model = _gpt2(tokenizer, recipe)

        def next_batch(step: int) -> _Batch:
            rows = _encode(tokenizer, greater_than_sentences(rng, recipe.batch_size, starts))
            b = _batch(rows, [False] * len(rows), tokenizer.pad_token_id, 1.0)
            b.weight[:, -2] = recipe.answer_weight  # predicting the end year (all rows have one length)
            return b

        seconds = _train(model, next_batch, recipe, steps, settings.progress)

    years = torch.tensor(tokenizer.convert_tokens_to_ids([f"{y:02d}" for y in range(100)]))
    metrics: dict[str, Any] = {"task": "greater-than"}
    for split, prefix in (("test", ""), ("train", "train_")):
        pairs = task.pairs(recipe.eval_prompts, seed=10_000 + settings.seed, split=split)
        data = tokenize_pairs(pairs, tokenizer)
        logits = _last_logits(model, data.clean)
        start = torch.tensor([p.meta["start"] for p in pairs])
        rows = torch.arange(len(data))
        year_logits = logits[:, years]
        diff = logits[rows, data.answer] - logits[rows, data.distractor]
        metrics[f"{prefix}accuracy"] = float((year_logits.argmax(-1) > start).float().mean())
        metrics[f"{prefix}prob_diff"] = float(greater_than_metric(tokenizer, pairs)(logits[:, None]).mean())
        metrics[f"{prefix}accuracy_vs_distractor"] = float((diff > 0).float().mean())
        metrics[f"{prefix}logit_diff"] = float(diff.mean())
        metrics[f"{prefix}boundary_accuracy"] = float(
            (year_logits[rows, (start + 1).clamp(max=99)] > year_logits[rows, start]).float().mean()
        )
    _save(folder, model, tokenizer)
    metrics.update({
        "accuracy_means": "the top two-digit year is above the start; prob_diff: P(years > start) - P(others); "
                          "boundary: start+1 beats start",
        "eval_prompts": recipe.eval_prompts,
        "eval_split": "test: prompts of held-out start years (multiples of 5)",
        **_training_record(recipe, model, steps, seconds),
    })
    return metrics


# ------------------------------------------------------------------ the zoo entries

#: Registered by the plugin's ``register_models`` hook; other zoo models of this adapter append here.
ZOO_MODELS: list[ZooModel] = [
    ZooModel(
        name="ioi-gpt2-tiny",
        description="2-layer GPT-2 (d_model 64) trained here on IOI; tested on held-out names",
        adapter="transformers",
        task="ioi",
        build=build_ioi,
        load=load_gpt2,
        version="1",
    ),
    ZooModel(
        name="ioi-gpt2-6x16",
        description="6-layer GPT-2 (16 heads, d_model 128) trained here on IOI; tested on held-out names",
        adapter="transformers",
        task="ioi",
        build=functools.partial(build_ioi, recipe=IOI_6X16_RECIPE, name="ioi-gpt2-6x16"),
        load=load_gpt2,
        version="1",
    ),
    ZooModel(
        name="greater-than-tiny",
        description="2-layer GPT-2 (d_model 64) trained here on greater-than; tested on held-out start years",
        adapter="transformers",
        task="greater-than",
        build=build_greater_than,
        load=load_gpt2,
        version="1",
    ),
]
