"""Verification: the emitted program against the network (and the task's answer) on every input.

Inputs are every sequence over the vocabulary of each length (``|vocab| ** length``, the last position
fastest, as :func:`~crosspatch.zoo.algorithmic.task.every_sequence` orders a task's inputs) when their
number is at most ``limit``, else ``limit`` seeded random ones of that length; the record says which.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch

from .program import Program
from .subject import Subject

__all__ = ["Verification", "enumerate_inputs", "verify"]


@dataclass
class Verification:
    """Counts of sequences (all positions equal) and of positions where the program equals the model
    (``model_*``) and the task's answer (``truth_*``, when the subject has one)."""

    inputs: dict[str, str] = field(default_factory=dict)
    sequences: int = 0
    positions: int = 0
    model_sequences: int = 0
    model_positions: int = 0
    truth_sequences: int | None = None
    truth_positions: int | None = None
    model_truth_sequences: int | None = None
    defined_sequences: int = 0
    defined_model_sequences: int = 0
    program_errors: int = 0
    first_mismatch: dict | None = None

    @property
    def equivalent(self) -> bool:
        """The program equals the network on every input checked."""
        return self.sequences > 0 and self.model_sequences == self.sequences

    @property
    def equivalent_where_defined(self) -> bool:
        """The program equals the network on every verified input whose output the network defines."""
        return self.defined_sequences > 0 and self.defined_model_sequences == self.defined_sequences

    @property
    def model_accuracy(self) -> float:
        return self.model_positions / max(self.positions, 1)

    @property
    def truth_accuracy(self) -> float | None:
        return None if self.truth_positions is None else self.truth_positions / max(self.positions, 1)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(equivalent=self.equivalent, equivalent_where_defined=self.equivalent_where_defined, model_accuracy=self.model_accuracy, truth_accuracy=self.truth_accuracy)
        return d


def enumerate_inputs(vocab: Sequence[Any], lengths: Sequence[int], limit: int = 200_000, seed: int = 0) -> tuple[list[list[Any]], dict[str, str]]:
    """Every sequence of each length, or ``limit`` random ones where there are more; with a description."""
    rng = random.Random(seed)
    seqs: list[list[Any]] = []
    said: dict[str, str] = {}
    for n in lengths:
        total = len(vocab) ** n
        if total <= limit:
            seqs.extend(list(s) for s in itertools.product(vocab, repeat=n))
            said[str(n)] = f"all {total}"
        else:
            seqs.extend([rng.choice(vocab) for _ in range(n)] for _ in range(limit))
            said[str(n)] = f"{limit} random of {total}"
    return seqs, said


def _equal(a: Any, b: Any, numerical: bool, tol: float) -> bool:
    if numerical:
        return a is not None and b is not None and abs(float(a) - float(b)) <= tol
    return a == b


def verify(subject: Subject, program: Program | Callable[[list], list], *, limit: int = 200_000, batch: int = 2048,
           tol: float = 1e-3, seqs: Sequence[Sequence[Any]] | None = None) -> Verification:
    """Run the network and the emitted program on the inputs (all of them where countable)."""
    fn = program.compiled() if isinstance(program, Program) else program
    if seqs is None:
        seqs, said = enumerate_inputs(subject.vocab, subject.lengths, limit)
    else:
        said = {"given": f"{len(seqs)} sequences"}
    v = Verification(inputs=said)
    if subject.truth is not None:
        v.truth_sequences = v.truth_positions = v.model_truth_sequences = 0
    by_len: dict[int, list[list[Any]]] = {}
    for s in seqs:
        by_len.setdefault(len(s), []).append(list(s))
    for _, group in sorted(by_len.items()):
        for i in range(0, len(group), batch):
            chunk = group[i: i + batch]
            with torch.inference_mode():
                out = subject.wrapped.run(subject.encode(chunk)).output
            decoded = subject.decode(out)
            for s, model_row, defined in zip(chunk, decoded, subject.defined(out)):
                model_vals = model_row[1:]
                try:
                    prog_vals = list(fn(s))
                except Exception as err:  # an emitted program that fails on an input is a finding
                    v.program_errors += 1
                    prog_vals = [None] * len(s)
                    if v.first_mismatch is None:
                        v.first_mismatch = {"input": s, "error": repr(err)}
                eq = [_equal(p, q, subject.numerical, tol) for p, q in zip(prog_vals, model_vals)]
                v.sequences += 1
                v.positions += len(s)
                v.model_positions += sum(eq)
                v.model_sequences += all(eq)
                v.defined_sequences += bool(defined)
                v.defined_model_sequences += bool(defined) and all(eq)
                if not all(eq) and v.first_mismatch is None:
                    v.first_mismatch = {"input": s, "model": model_vals, "program": prog_vals}
                if subject.truth is not None:
                    truth = list(subject.truth(s))
                    teq = [_equal(p, t, subject.numerical, tol) for p, t in zip(prog_vals, truth)]
                    v.truth_positions += sum(teq)
                    v.truth_sequences += all(teq)
                    v.model_truth_sequences += all(_equal(p, t, subject.numerical, tol) for p, t in zip(model_vals, truth))
    return v
