"""The information-flow study on ``shapes-vlm``: attention knockout per question type, and image-token patching
between images that differ in one factor.

- :func:`question_prompts`: prompts asking one question about ``n`` shapes images, with the position groups
  ``image``, ``question`` and ``last``, and which rows the model answers right.
- :func:`flow_by_question`: :func:`~crosspatch.methods.vlm_flow.cross_modal_flow` for each question, on the rows
  the model answers right (as in the paper), the answer being the right word.
- :func:`image_pair_patching`: activation patching (denoising, normalised) over the language model's layers
  between image pairs that differ only in ``colour`` (asked the colour question) or only in ``shape`` (asked the
  shape question), at the image tokens, the question tokens and the last token: where the attribute sits, layer
  by layer, on its way into the text stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from crosspatch.engine.model import WrappedModel
from crosspatch.methods.vlm_flow import Flow, cross_modal_flow
from crosspatch.results.result import Result

from . import llava
from .shapes_questions import QUESTIONS, ShapesPrompts, shapes_prompts
from .zoo import draw_factors, questions_batch

__all__ = ["PATCH_SITES", "QuestionPrompts", "flow_by_question", "image_pair_patching", "question_prompts", "subset"]

#: Rows of the patching figure: a label and a site pattern naming a position group.
PATCH_SITES: dict[str, str] = {
    "resid_pre @ image tokens": "resid_pre.*[pos=image]",
    "resid_pre @ question": "resid_pre.*[pos=question]",
    "resid_pre @ last": "resid_pre.*[pos=last]",
    "attn_out @ last": "attn_out.*[pos=last]",
    "mlp_out @ last": "mlp_out.*[pos=last]",
}

#: The question each factor is asked through in :func:`image_pair_patching`.
FACTOR_QUESTION = {"colour": "colour", "shape": "shape"}


@dataclass
class QuestionPrompts:
    """Prompts for one question and whether the model's top token is the right answer on each row."""

    prompts: ShapesPrompts
    correct: torch.Tensor  # [rows] bool

    @property
    def accuracy(self) -> float:
        return float(self.correct.float().mean())


def subset(inputs: dict[str, Any], rows: torch.Tensor) -> dict[str, Any]:
    """The rows ``rows`` (a bool mask or indices) of raw VLM inputs whose groups are one span for all rows."""
    return {k: (v if k == "groups" else v[rows]) for k, v in inputs.items()}


def _task():
    from crosspatch.zoo.tasks.shapes import ShapesTask

    return ShapesTask()


def _top(m: WrappedModel, inputs: dict[str, Any]) -> torch.Tensor:
    with torch.inference_mode():
        return m.run(m.prepare(inputs)).output[:, -1].argmax(-1)


def question_prompts(m: WrappedModel, tokenizer: Any, question: str, n: int, *, split: str = "test",
                     seed: int = 0) -> QuestionPrompts:
    """``n`` images of ``split`` (``"test"``: images ``shapes-vlm`` never saw in training, :func:`.zoo.draw_factors`)
    asked ``question`` (for ``left``, half the shapes on the left)."""
    task = _task()
    gen = torch.Generator().manual_seed(seed)
    batch = questions_batch(task, draw_factors(task, n, split, gen), question, gen)
    prompts = shapes_prompts(tokenizer, batch.images, batch.values, question, llava.image_tokens(m.module), task)
    return QuestionPrompts(prompts, _top(m, prompts.inputs) == prompts.answer)


def flow_by_question(m: WrappedModel, tokenizer: Any, n: int = 64, *, window: int = 3, split: str = "test",
                     seed: int = 0, n_boot: int = 1000, questions: tuple[str, ...] = tuple(QUESTIONS)) -> dict[str, Flow]:
    """:func:`cross_modal_flow` per question on the rows answered right (the paper's edge sets and windows)."""
    out = {}
    for i, q in enumerate(questions):
        qp = question_prompts(m, tokenizer, q, n, split=split, seed=seed + i)
        keep = qp.correct
        if not bool(keep.any()):
            raise ValueError(f"shapes-vlm answers no {q!r} question right among {n}; is the model trained?")
        flow = cross_modal_flow(m, subset(qp.prompts.inputs, keep), window=window, answers=qp.prompts.answer[keep],
                                n_boot=n_boot, seed=seed)
        flow.metadata.update({"question": QUESTIONS[q].text, "accuracy": qp.accuracy, "split": split})
        out[q] = flow
    return out


def image_pair_patching(m: WrappedModel, tokenizer: Any, factor: str, n: int = 64, *, split: str = "test",
                        seed: int = 0, sites: dict[str, str] | None = None) -> Result:
    """Denoising patching (clean image -> corrupt image, normalised: 1 restores the whole gap) of each site of
    ``sites`` (default :data:`PATCH_SITES`) at every layer, for image pairs differing only in ``factor``.

    The metric is the logit of the clean image's answer minus the corrupt image's, at the last token. Returns
    a Result with dims ``("site", "layer")``.
    """
    from crosspatch.methods.activation_patching import activation_patching
    from crosspatch.results.metrics import logit_diff

    if factor not in FACTOR_QUESTION:
        raise ValueError(f"factor must be one of {', '.join(FACTOR_QUESTION)}, got {factor!r}")
    task = _task()
    gen = torch.Generator().manual_seed(seed)
    factors = draw_factors(task, n, split, gen)
    size = task.sizes[factor]
    other = {**factors, factor: (factors[factor] + torch.randint(1, size, (n,), generator=gen)) % size}
    pairs = [task.batch(f) for f in (factors, other)]
    q, k = FACTOR_QUESTION[factor], llava.image_tokens(m.module)
    clean = shapes_prompts(tokenizer, pairs[0].images, pairs[0].values, q, k, task)
    corrupt = shapes_prompts(tokenizer, pairs[1].images, pairs[1].values, q, k, task)
    metric = logit_diff(clean.answer, corrupt.answer)
    sites = PATCH_SITES if sites is None else sites
    results = [activation_patching(m, clean.inputs, corrupt.inputs, p, metric,
                                   normalize=True, progress=False) for p in sites.values()]
    base = results[0].metadata.get("baseline")
    correct = (_top(m, clean.inputs) == clean.answer) & (_top(m, corrupt.inputs) == corrupt.answer)
    meta = {"method": "image_pair_patching", "factor": factor, "question": QUESTIONS[q].text, "pairs": n,
            "split": split, "seed": seed, "sites": dict(sites), "baseline": base,
            "both_right": float(correct.float().mean()), "metric": "normalised logit diff (clean - corrupt answer)"}
    return Result(np.stack([np.asarray(r.values, dtype=float) for r in results]), ("site", "layer"),
                  {"site": list(sites), "layer": list(range(results[0].values.shape[-1]))}, meta)
