"""Greater-than: "The war lasted from the year 1732 to the year 17" -> a two-digit year above 32.

After Hanna et al. (2023). A year is written the way GPT-2 tokenizes most of them, as a century
token "17" and a two-digit token "32"; the zoo's word-level tokenizer splits digits in pairs the
same way (:func:`crosspatch.tasks.words`), so every two-digit number is one token and the model
answers with one token that continues the century without a space (``answer_prefix=""``).

Start years ``YY`` run over 02..98 (so at least one valid answer remains and the corruption changes
something); years with ``YY % 5 == 0`` are the ``test`` split, the rest ``train``. Centuries are
11..17.

The pair's ``answer`` is the middle of the correct range, ``(YY + 100) // 2`` (always above ``YY``),
and the ``distractor`` the middle of the wrong range, ``max(2, YY // 2)`` (never above ``YY``). Years
right at the boundary (``YY + 1`` against ``YY``) would be the sharpest test, but models, GPT-2 as
much as the zoo's, draw a soft boundary a few years wide, and their logit difference says little;
two years well inside each range separate cleanly. Both are at least 02, so the corruption makes
both of them correct. The corruption is the standard one of the literature: the start year's two
digits become ``"01"`` (factor ``"start_year"``), after which nearly every year is "greater" and
the comparison has nothing left to separate.

The task's own measure is the probability mass on years above the start minus the mass on the
others, :func:`greater_than_metric`.
"""

from __future__ import annotations

import random
from typing import Any, Sequence

import torch

from ...results.metrics import Metric, MetricContext, _at, _wide
from .base import Split, TaskError, TextPair, TokenizedPairs, _single_token, check_pair_arguments, check_split, words

__all__ = [
    "CENTURIES", "GreaterThanTask", "NOUNS", "START_YEARS", "TEMPLATES", "answer_year", "distractor_year",
    "greater_than_metric",
]

NOUNS: tuple[str, ...] = (
    "war", "expedition", "reign", "drought", "siege", "voyage", "dynasty", "pilgrimage", "rivalry",
    "treaty", "journey", "project", "plague", "rebellion", "famine", "friendship", "marriage",
    "campaign", "conflict", "occupation",
)
#: All templates have 12 word-level tokens: century at 6, the start's two digits at 7, answer predicted at 11.
TEMPLATES: tuple[str, ...] = (
    "The {noun} lasted from the year {century}{start} to the year {century}",
    "The {noun} ran from the year {century}{start} to the year {century}",
    "The {noun} continued from the year {century}{start} to the year {century}",
    "The {noun} stretched from the year {century}{start} to the year {century}",
)
CENTURIES: tuple[int, ...] = tuple(range(11, 18))
#: Start years (two digits) that prompts use; the corruption writes 01.
START_YEARS: tuple[int, ...] = tuple(range(2, 99))
CORRUPT_START = 1

POSITIONS = {"century": 6, "start": 7, "end": 11}


def answer_year(start: int) -> int:
    """The pair's answer for start year ``start``: the middle of the correct years start+1..99."""
    return (start + 100) // 2


def distractor_year(start: int) -> int:
    """The pair's distractor: the middle of the wrong years 02..start (02 and up stay correct after
    the corruption to 01)."""
    return max(2, start // 2)


class GreaterThanTask:
    """Greater-than prompts; ``answer`` and ``distractor`` are two-digit strings (see the module doc)."""

    name = "greater-than"
    description = "greater-than: 'The war lasted from the year 1732 to the year 17' -> a year above 32"
    modality = "text"
    factors: tuple[str, ...] = ("start_year",)
    templates: tuple[str, ...] = TEMPLATES

    def start_years(self, split: Split = "test") -> tuple[int, ...]:
        """Start years of one split: multiples of 5 for ``test``, the rest for ``train``."""
        check_split(split, self.name)
        return tuple(y for y in START_YEARS if (y % 5 == 0) == (split == "test"))

    def pairs(
        self,
        n: int,
        *,
        seed: int = 0,
        split: Split = "test",
        factor: str | None = None,
        template: int | None = None,
    ) -> list[TextPair]:
        """``n`` clean/corrupt pairs, the same for the same arguments; ``template`` fixes one template."""
        check_pair_arguments(self, n, factor, template)
        starts = self.start_years(split)
        rng = random.Random(f"{self.name}/{split}/{seed}")
        out = []
        for _ in range(n):
            t = template if template is not None else rng.randrange(len(self.templates))
            noun, century, start = rng.choice(NOUNS), rng.choice(CENTURIES), rng.choice(starts)
            fmt = self.templates[t]
            clean = fmt.format(noun=noun, century=century, start=f"{start:02d}")
            corrupt = fmt.format(noun=noun, century=century, start=f"{CORRUPT_START:02d}")
            meta = {"template": t, "noun": noun, "century": century, "start": start, "positions": dict(POSITIONS)}
            answer, distractor = f"{answer_year(start):02d}", f"{distractor_year(start):02d}"
            out.append(TextPair(clean, corrupt, answer, distractor, "start_year", meta, answer_prefix=""))
        return out

    def max_pairs(self, split: Split = "test") -> int:
        """How many distinct pairs ``split`` has: start years x nouns x centuries x templates."""
        return len(self.start_years(split)) * len(NOUNS) * len(CENTURIES) * len(self.templates)

    def vocabulary(self) -> list[str]:
        """Every token (in the sense of :func:`crosspatch.tasks.words`) a prompt or answer can contain:
        the template words, the nouns and every two-digit number 00..99."""
        vocab = set(NOUNS) | {f"{y:02d}" for y in range(100)}
        for fmt in self.templates:
            vocab.update(words(fmt.format(noun="", century="", start="")))
        return sorted(vocab)

    def __repr__(self) -> str:
        return f"GreaterThanTask({len(self.templates)} templates, {len(NOUNS)} nouns)"


def _starts(starts: Any) -> list[int]:
    if isinstance(starts, TokenizedPairs):
        starts = starts.pairs
    if isinstance(starts, torch.Tensor):
        return [int(s) for s in starts.flatten().tolist()]
    out = []
    for s in starts:
        if isinstance(s, TextPair):
            if "start" not in s.meta:
                raise TaskError(f"pair {s.clean!r} has no meta['start']; is it a greater-than pair?")
            s = s.meta["start"]
        out.append(int(s))
    if any(not 0 <= s <= 99 for s in out):
        raise TaskError(f"start years must be two-digit numbers 0..99, got {out}")
    return out


def greater_than_metric(tokenizer, starts: "Sequence[int] | Sequence[TextPair] | TokenizedPairs | torch.Tensor",
                        pos: int = -1) -> Metric:
    """Probability mass on two-digit years above each prompt's start minus the mass on the others.

    ``starts`` gives each prompt's start year ``YY`` (ints, the task's pairs, or their
    :class:`TokenizedPairs`); in a batched sweep ``ctx.example`` maps rows to prompts. The
    probabilities are the model's full softmax at ``pos`` restricted to the 100 tokens "00".."99"
    (written without a leading space, as they continue the century), so the value lies in [-1, 1]
    and only mass on years counts. Every "00".."99" must be a single token of ``tokenizer``.
    """
    years = torch.tensor([_single_token(tokenizer, f"{y:02d}", "year") for y in range(100)])
    start = torch.tensor(_starts(starts))

    def fn(output: torch.Tensor, ctx: MetricContext) -> torch.Tensor:
        logits = _wide(_at(output, pos, ctx))
        probs = logits.softmax(dim=-1)[:, years.to(logits.device)]  # [rows, 100]
        row_start = start.to(logits.device)[ctx.example.to(logits.device)]
        above = torch.arange(100, device=logits.device)[None, :] > row_start[:, None]
        return (probs * above).sum(dim=-1) - (probs * ~above).sum(dim=-1)

    return Metric("prob_diff_greater", fn)
