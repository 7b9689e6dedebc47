"""Indirect object identification (IOI): "When Mary and John went to the store, John gave a drink to" -> Mary.

The clean prompt names two people, then repeats one of them (the subject, S) as the giver; the
answer is the other one, the indirect object (IO). The corruption is the standard "ABC" one of
Wang et al. (2022): the second mention of the subject becomes a third name, so the prompt no longer
says who is left out. Clean and corrupt differ in exactly that one word (factor
``"subject_repeat"``) and tokenize to the same length under any tokenizer that makes each name
one token.

All templates have the same word structure: 14 word-level tokens (``crosspatch.tasks.words``),
the two names at positions 1 and 3, the repeated subject at 9, the answer predicted at 13. So a
batch may mix templates and a positional sweep (``resid_pre.*[pos=*]``) still lines up. Under a
subword tokenizer (GPT-2) the templates can tokenize to different lengths: pass ``template=i``.

The names are common English first names, most from the list of Wang et al., chosen to be one GPT-2
token each with a leading space (as their list is; this repository holds no GPT-2 vocabulary to
check it against, so with a real GPT-2 run ``tokenize_pairs``: it raises on any name that is not
one token). They are split once, by position in the list, into ``train`` names and ``test`` names
that share none; a model trained on ``train`` prompts is measured on ``test`` ones.
"""

from __future__ import annotations

import random
from typing import Literal

from .base import Split, TaskError, TextPair, check_pair_arguments, check_split, words

__all__ = ["IOITask", "NAMES", "TRAIN_NAMES", "TEST_NAMES", "PLACES", "OBJECTS", "TEMPLATES"]

#: Every name the task uses; one token each for the zoo tokenizer (and meant to be for GPT-2, with a leading space).
NAMES: tuple[str, ...] = tuple(
    """
    Mary John Michael David James Robert Sarah Paul Mark Adam Kevin Eric Ryan Jason Daniel Thomas
    Richard Charles Joseph William Andrew Steven Brian Scott Lisa Laura Emily Rachel Jessica Jennifer
    Michelle Amy Kelly Anna Alice Tom Jack Peter George Frank Henry Sam Ben Max Alex Kate Emma Jane
    Susan Karen Linda Nancy Helen Ruth Victoria Grace Justin Kyle Tim Patrick Sean Nathan Aaron
    Christopher Matthew Joshua Jonathan Nicholas Anthony Jeremy Benjamin Samuel Tyler Brandon Jacob
    Stephen Gregory Jeff Lucy Rose
    """.split()
)
#: Every fourth name is held out for testing; the others are for training.
TEST_NAMES: tuple[str, ...] = NAMES[3::4]
TRAIN_NAMES: tuple[str, ...] = tuple(n for i, n in enumerate(NAMES) if i % 4 != 3)

PLACES: tuple[str, ...] = (
    "store", "park", "school", "station", "garden", "market", "hospital", "library",
    "restaurant", "beach", "museum", "office", "house", "cafe", "river", "farm",
)
#: Objects start with a consonant, so the article is always "a".
OBJECTS: tuple[str, ...] = (
    "drink", "book", "ring", "basket", "snack", "bone", "computer", "necklace",
    "gift", "bottle", "letter", "kite", "ball", "pen", "card", "flower",
)

#: ``{a}`` and ``{b}`` are the two names in order of mention, ``{s}`` the subject's second mention.
TEMPLATES: tuple[str, ...] = (
    "When {a} and {b} went to the {place}, {s} gave a {object} to",
    "After {a} and {b} went to the {place}, {s} gave a {object} to",
    "While {a} and {b} were at the {place}, {s} handed a {object} to",
    "When {a} and {b} arrived at the {place}, {s} brought a {object} to",
    "Once {a} and {b} got to the {place}, {s} passed a {object} to",
    "Then {a} and {b} walked to the {place}, {s} threw a {object} to",
)

#: Word positions (``words(prompt)`` indices) shared by every template.
POSITIONS = {"name1": 1, "name2": 3, "s2": 9, "end": 13}

Order = Literal["ABBA", "BABA"]
_ORDERS: tuple[str, ...] = ("ABBA", "BABA")


class IOITask:
    """IOI prompts: the answer is the indirect object, the distractor the (repeated) subject.

    ``order`` ``"ABBA"`` names the indirect object first ("When Mary and John ..., John gave ... to"),
    ``"BABA"`` the subject first ("When John and Mary ..., John gave ... to"); by default each pair
    draws one. The corruption replaces the subject's second mention by a third name of the same split.
    """

    name = "ioi"
    description = "indirect object identification: 'When Mary and John went to the store, John gave a drink to' -> Mary"
    modality = "text"
    factors: tuple[str, ...] = ("subject_repeat",)
    templates: tuple[str, ...] = TEMPLATES

    def names(self, split: Split = "test") -> tuple[str, ...]:
        """The names of one split (train and test share none)."""
        check_split(split, self.name)
        return TRAIN_NAMES if split == "train" else TEST_NAMES

    def pairs(
        self,
        n: int,
        *,
        seed: int = 0,
        split: Split = "test",
        factor: str | None = None,
        template: int | None = None,
        order: Order | None = None,
    ) -> list[TextPair]:
        """``n`` clean/corrupt pairs, the same for the same arguments.

        ``template`` fixes one template (an index into :attr:`templates`), ``order`` one name order.
        """
        check_pair_arguments(self, n, factor, template)
        if order is not None and order not in _ORDERS:
            raise TaskError(f"order must be 'ABBA' or 'BABA', got {order!r}")
        names = self.names(split)
        rng = random.Random(f"{self.name}/{split}/{seed}")
        out = []
        for _ in range(n):
            t = template if template is not None else rng.randrange(len(self.templates))
            o = order if order is not None else rng.choice(_ORDERS)
            io, s, c = rng.sample(names, 3)
            place, obj = rng.choice(PLACES), rng.choice(OBJECTS)
            a, b = (io, s) if o == "ABBA" else (s, io)
            fmt = self.templates[t]
            clean = fmt.format(a=a, b=b, s=s, place=place, object=obj)
            corrupt = fmt.format(a=a, b=b, s=c, place=place, object=obj)
            meta = {
                "template": t, "order": o, "io": io, "s": s, "c": c, "place": place, "object": obj,
                "positions": {"io": 1 if o == "ABBA" else 3, "s1": 3 if o == "ABBA" else 1,
                              "s2": POSITIONS["s2"], "end": POSITIONS["end"]},
            }
            out.append(TextPair(clean, corrupt, io, s, "subject_repeat", meta))
        return out

    def max_pairs(self, split: Split = "test") -> int:
        """How many distinct pairs ``split`` has: ordered (io, s, c) name triples x orders x templates x
        places x objects (``pairs`` draws with replacement, so ``n`` may exceed it only with repeats)."""
        k = len(self.names(split))
        return k * (k - 1) * (k - 2) * len(_ORDERS) * len(self.templates) * len(PLACES) * len(OBJECTS)

    def vocabulary(self) -> list[str]:
        """Every token (in the sense of :func:`crosspatch.tasks.words`) a prompt or answer can contain."""
        vocab: set[str] = set(NAMES) | set(PLACES) | set(OBJECTS)
        for fmt in self.templates:
            vocab.update(words(fmt.format(a="", b="", s="", place="", object="")))
        return sorted(vocab)

    def __repr__(self) -> str:
        return f"IOITask({len(self.templates)} templates, {len(TRAIN_NAMES)} train / {len(TEST_NAMES)} test names)"

