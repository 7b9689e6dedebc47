"""Verification of an emitted program: against the network on every input up to a length, and against
the task's ground truth on longer, held-out lengths.

Both the network and an emitted program produce one output per step from the prefix so far, so the
sequences of the longest length cover every shorter input as a prefix; when ``alphabet**length`` is
more than ``exhaustive_limit`` sequences, ``random_count`` seeded random sequences are checked instead.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np

from ...zoo.algorithmic.rnn import TaskRNN
from .inputs import Alphabet, all_sequences, random_sequences, run_predict

__all__ = ["Verification", "compile_program", "verify_program", "as_program_input"]


@dataclass
class Verification:
    """What was checked and how many sequences disagreed (a sequence disagrees if any step does).

    ``network_mode`` is ``"exhaustive"`` or ``"random"``; ``truth_lengths`` the held-out lengths
    compared with the ground truth (empty when no truth was given); ``network_wrong_program_right``
    how many of the (first 1000) inputs where program and network differ are ones where the network is
    wrong and the program agrees with the ground truth; ``examples`` a few disagreements."""

    length: int
    network_mode: str
    network_checked: int
    network_mismatches: int
    truth_lengths: list[int] = field(default_factory=list)
    truth_checked: int = 0
    truth_mismatches: int = 0
    network_wrong_program_right: int = 0
    examples: list[dict[str, Any]] = field(default_factory=list)

    @property
    def matches_network(self) -> bool:
        return self.network_checked > 0 and self.network_mismatches == 0

    @property
    def matches_truth(self) -> bool:
        return self.truth_checked > 0 and self.truth_mismatches == 0

    @property
    def solved(self) -> bool:
        """Equal to the network on every checked input and to the ground truth on held-out lengths."""
        return self.matches_network and self.matches_truth

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(matches_network=self.matches_network, matches_truth=self.matches_truth, solved=self.solved)
        return d


def compile_program(text: str) -> Callable[[list], list[int]]:
    """``program`` from an emitted module's text (refused if it imports anything)."""
    for line in text.splitlines():
        if line.lstrip().startswith(("import ", "from ")) and not line.lstrip().startswith("from __future__"):
            raise ValueError(f"an emitted program must be standalone, but it has the line {line.strip()!r}")
    namespace: dict[str, Any] = {"__name__": "extracted_program"}
    exec(compile(text, "<extracted program>", "exec"), namespace)  # noqa: S102 - our own emitted text
    return namespace["program"]


def as_program_input(seqs: np.ndarray) -> list[list]:
    """``[N, T, d]`` integer arrays as program inputs: lists of ints (``d = 1``) or of tuples."""
    if seqs.shape[-1] == 1:
        return seqs[..., 0].tolist()
    return [[tuple(step) for step in seq] for seq in seqs.tolist()]


def _compare(program: Callable, seqs: np.ndarray, expected: np.ndarray, label: str, examples: list,
             wrong: list | None = None) -> int:
    bad = 0
    for seq, want in zip(as_program_input(seqs), expected.tolist()):
        try:
            got = [int(v) for v in program(seq)]
        except Exception as exc:  # a wrong program may raise (an unknown table key): that is a mismatch
            got = [f"{type(exc).__name__}: {exc}"]
        if got != want:
            bad += 1
            if wrong is not None and len(wrong) < 1000:
                wrong.append((seq, got))
            if len(examples) < 5:
                examples.append({"against": label, "input": seq, "expected": want, "program": got})
    return bad


def verify_program(
    text: str,
    rnn: TaskRNN,
    alphabet: Alphabet,
    truth: Callable[[list], list[int]] | None = None,
    *,
    length: int = 12,
    held_out: tuple[int, ...] = (16, 24, 40),
    held_out_count: int = 300,
    exhaustive_limit: int = 600_000,
    random_count: int = 100_000,
    seed: int = 0,
) -> Verification:
    """Check ``text``'s ``program`` against ``rnn`` (inputs up to ``length``) and ``truth`` (held out)."""
    program = compile_program(text)
    if len(alphabet) ** length <= exhaustive_limit:
        seqs, mode = all_sequences(alphabet, length), "exhaustive"
    else:
        seqs, mode = random_sequences(alphabet, random_count, length, seed), "random"
    examples: list[dict[str, Any]] = []
    wrong: list = []
    bad = _compare(program, seqs, run_predict(rnn, seqs), "network", examples, wrong)
    out = Verification(length, mode, len(seqs), bad, examples=examples)
    if truth is not None:
        out.network_wrong_program_right = sum(1 for seq, got in wrong if truth(seq) == got)
        for i, n in enumerate(held_out):
            long = random_sequences(alphabet, held_out_count, n, seed + 1 + i)
            expected = np.array([truth(s) for s in as_program_input(long)], dtype=np.int64)
            out.truth_mismatches += _compare(program, long, expected, f"truth at length {n}", examples)
            out.truth_checked += len(long)
        out.truth_lengths = list(held_out)
    return out
