"""Counterfactual tasks: seeded generators of input pairs that differ in exactly one named factor.

Tasks are architecture-agnostic. Text tasks yield strings (a model's own tokenizer turns them into
ids with :func:`tokenize_pairs`); image tasks yield tensors. Tasks register through the
``register_tasks`` plugin hook, so plugins can add their own.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, Sequence

import torch

__all__ = ["TextPair", "TokenizedPairs", "Task", "tokenize_pairs", "TaskError", "words"]

Split = Literal["train", "test"]
SPLITS: tuple[str, ...] = ("train", "test")


class TaskError(ValueError):
    """A task cannot produce what was asked (bad split, factor, tokenizer mismatch...)."""


@dataclass(frozen=True)
class TextPair:
    """A clean and a corrupted prompt that differ in one factor.

    ``answer`` is the continuation the clean prompt calls for; ``distractor`` the one the
    corruption points to (or the strongest wrong answer). Both are single tokens for the
    tokenizers the zoo builds. ``answer_prefix`` is the text between the prompt and the answer:
    ``" "`` for a next word (" Mary"), ``""`` when the answer continues the last word (the
    "32" of "17" + "32", which GPT-2 writes without a space).
    """

    clean: str
    corrupt: str
    answer: str
    distractor: str
    factor: str
    meta: dict[str, Any] = field(default_factory=dict, compare=False)
    answer_prefix: str = " "


@dataclass
class TokenizedPairs:
    """Text pairs as id tensors, ready for ``activation_patching`` and the metrics."""

    clean: torch.Tensor  # [n, pos]
    corrupt: torch.Tensor  # [n, pos]
    answer: torch.Tensor  # [n] token ids
    distractor: torch.Tensor  # [n] token ids
    pairs: list[TextPair]

    def __len__(self) -> int:
        return self.clean.shape[0]


class Task(Protocol):
    """What every task provides. ``modality`` is ``"text"`` or ``"image"``."""

    name: str
    description: str
    modality: str
    factors: tuple[str, ...]

    def pairs(self, n: int, *, seed: int = 0, split: Split = "test", factor: str | None = None) -> Any:
        """``n`` counterfactual pairs, reproducible from ``seed``; ``split`` keeps train and test apart."""
        ...


_WORD = re.compile(r"\d\d|\d|[^\W\d]+|[^\w\s]+")


def words(text: str) -> list[str]:
    """The tokens a word-level tokenizer makes of ``text``: runs of letters, runs of punctuation,
    and numbers in pairs of digits ("1732" -> "17", "32", as GPT-2 splits most years).

    The zoo's word-level tokenizers split text the same way (``Whitespace`` then digit pairs), and
    a text task's ``vocabulary()`` lists tokens in this sense.
    """
    return _WORD.findall(text)


def check_split(split: str, task: str) -> None:
    if split not in SPLITS:
        raise TaskError(f"unknown split {split!r} for task {task!r}; splits: {', '.join(SPLITS)}")


def check_pair_arguments(task: "Task", n: int, factor: str | None, template: int | None) -> None:
    """The arguments every text task's ``pairs`` takes, checked once for all of them."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise TaskError(f"n must be a positive int, got {n!r}")
    if factor not in (None, *task.factors):
        raise TaskError(f"task {task.name!r} has no factor {factor!r}; factors: {', '.join(task.factors)}")
    templates = task.templates  # type: ignore[attr-defined]
    if template is not None and template not in range(len(templates)):
        raise TaskError(f"template must be in 0..{len(templates) - 1}, got {template!r}")


def _single_token(tokenizer, text: str, what: str) -> int:
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != 1:
        raise TaskError(f"{what} {text!r} is {len(ids)} tokens for this tokenizer; the metrics need exactly one")
    return ids[0]


def tokenize_pairs(pairs: Sequence[TextPair], tokenizer) -> TokenizedPairs:
    """Tokenize with a HuggingFace tokenizer; clean and corrupt must have the same length per pair,
    and all pairs the same length (the IOI and greater-than templates are built that way)."""
    if not pairs:
        raise TaskError("no pairs to tokenize")
    clean = [tokenizer.encode(p.clean, add_special_tokens=False) for p in pairs]
    corrupt = [tokenizer.encode(p.corrupt, add_special_tokens=False) for p in pairs]
    for p, a, b in zip(pairs, clean, corrupt):
        if len(a) != len(b):
            raise TaskError(
                f"clean and corrupt prompts tokenize to {len(a)} and {len(b)} tokens: {p.clean!r} / {p.corrupt!r}; "
                f"patching pairs them position by position"
            )
    lengths = {len(a) for a in clean}
    if len(lengths) != 1:
        raise TaskError(f"prompts tokenize to different lengths {sorted(lengths)}; draw pairs from one template length")
    return TokenizedPairs(
        clean=torch.tensor(clean),
        corrupt=torch.tensor(corrupt),
        answer=torch.tensor([_single_token(tokenizer, p.answer_prefix + p.answer.strip(), "answer") for p in pairs]),
        distractor=torch.tensor(
            [_single_token(tokenizer, p.answer_prefix + p.distractor.strip(), "distractor") for p in pairs]
        ),
        pairs=list(pairs),
    )
