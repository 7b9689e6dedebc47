"""Questions about a shapes image, for a LLaVA-style model: the prompts, their position groups and one-token answers.

A prompt is ``<bos> <image> x k`` followed by one question::

    colour   "what colour is the shape ?"   -> red / green / blue / yellow / magenta / cyan (...)
    shape    "what shape is it ?"           -> circle / square / triangle / cross
    left     "is it on the left ?"          -> yes / no   (x factor is "left")

The answer is one word, so one token of the word-level tokenizer (:func:`shapes_tokenizer`). The prompt's
groups (:mod:`.groups`) are ``image`` (the ``k`` image tokens), ``question`` (the question's words before
its final ``?``) and ``last`` (the final ``?``, where the answer is read).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

__all__ = ["IMAGE", "QUESTIONS", "Question", "ShapesPrompts", "shapes_prompts", "shapes_tokenizer", "vocabulary"]

IMAGE = "<image>"


@dataclass(frozen=True)
class Question:
    """A question type: its words, the factor it asks about, and the answer word for each row."""

    name: str
    text: str

    def answers(self, values: dict[str, list]) -> list[str]:
        """One answer word per row, from a :class:`~crosspatch.zoo.tasks.shapes.ShapeBatch`'s readable values."""
        if self.name == "colour":
            return list(values["colour"])
        if self.name == "shape":
            return list(values["shape"])
        return ["yes" if x == "left" else "no" for x in values["x"]]

    def choices(self, task: Any) -> tuple[str, ...]:
        """The answer words this question can have for ``task``."""
        return {"colour": tuple(task.colours), "shape": tuple(task.shapes)}.get(self.name, ("yes", "no"))


QUESTIONS: dict[str, Question] = {
    q.name: q for q in (
        Question("colour", "what colour is the shape ?"),
        Question("shape", "what shape is it ?"),
        Question("left", "is it on the left ?"),
    )
}


def vocabulary(task: Any) -> list[str]:
    """Every word of the questions and answers for ``task`` (its shapes and colours)."""
    words = {w for q in QUESTIONS.values() for w in q.text.split()}
    return sorted(words | set(task.shapes) | set(task.colours) | {"yes", "no"})


def shapes_tokenizer(task: Any):
    """A word-level tokenizer over :func:`vocabulary` with ``<image>`` as one special token (no download)."""
    from crosspatch.adapters.transformers.zoo import word_tokenizer

    tok = word_tokenizer(vocabulary(task))
    tok.add_tokens([IMAGE], special_tokens=True)
    return tok


@dataclass
class ShapesPrompts:
    """Model inputs for one question type over a batch of images, and what the answer should be.

    ``inputs`` is what the vlm adapter takes (``input_ids``, ``attention_mask``, ``pixel_values`` and
    ``groups={"question": (start, stop)}``); ``answer`` holds the right answer's token id per row and
    ``choices`` the token ids of every answer the question can have.
    """

    inputs: dict[str, Any]
    answer: torch.Tensor
    choices: torch.Tensor
    question: Question
    answer_words: list[str]


def shapes_prompts(tokenizer: Any, images: torch.Tensor, values: dict[str, list], question: str | Question,
                   image_tokens: int, task: Any) -> ShapesPrompts:
    """Prompts asking ``question`` about each image (``[rows, 3, H, W]``; ``values`` its readable factors)."""
    q = QUESTIONS[question] if isinstance(question, str) else question
    if not isinstance(q, Question):
        raise ValueError(f"unknown question {question!r}; questions: {', '.join(QUESTIONS)}")
    words = q.text.split()
    ids = [tokenizer.bos_token_id] + [tokenizer.convert_tokens_to_ids(IMAGE)] * image_tokens
    ids += tokenizer.convert_tokens_to_ids(words)
    rows = images.shape[0]
    input_ids = torch.tensor(ids, dtype=torch.long).expand(rows, -1).clone()
    start = 1 + image_tokens
    answer_words = q.answers(values)
    return ShapesPrompts(
        inputs={"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "pixel_values": images,
                "groups": {"question": (start, start + len(words) - 1)}},
        answer=torch.tensor(tokenizer.convert_tokens_to_ids(answer_words), dtype=torch.long),
        choices=torch.tensor(tokenizer.convert_tokens_to_ids(list(q.choices(task))), dtype=torch.long),
        question=q,
        answer_words=answer_words,
    )


def unknown_words(tokenizer: Any, words: Sequence[str]) -> list[str]:
    """Words of ``words`` the tokenizer maps to ``<unk>``."""
    return [w for w in words if tokenizer.convert_tokens_to_ids(w) == tokenizer.unk_token_id]
