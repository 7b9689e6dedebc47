"""The verifier's inputs, enumerated by crosspatch.zoo.algorithmic.task.every_sequence: the same sequences,
in the same order and of the same token objects, as itertools.product over the vocabulary gives."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

from crosspatch.methods.decompile.verify import enumerate_inputs


def _product_inputs(vocab, lengths, limit=200_000, seed=0):
    """The enumeration as written with itertools.product (the oracle)."""
    rng = random.Random(seed)
    seqs, said = [], {}
    for n in lengths:
        total = len(vocab) ** n
        if total <= limit:
            seqs.extend(list(s) for s in itertools.product(vocab, repeat=n))
            said[str(n)] = f"all {total}"
        else:
            seqs.extend([rng.choice(vocab) for _ in range(n)] for _ in range(limit))
            said[str(n)] = f"{limit} random of {total}"
    return seqs, said


CASES = {
    "letters": (["a", "b", "c"], [1, 2, 3], 200_000),
    "bits, length 0 and 4": ([0, 1], [0, 1, 4], 200_000),
    "mixed tokens": ([3, "x", None, 2.5, True], [2, 3], 200_000),
    "numpy ints": (list(np.arange(4, dtype=np.int64)), [1, 2, 3], 200_000),
    "tuple vocabulary": (("BOS-free", "y"), [5], 200_000),
    "over the limit": (["p", "q", "r"], [2, 4, 5], 30),
    "empty vocabulary": ([], [0, 1, 2], 200_000),
}


@pytest.mark.parametrize("vocab, lengths, limit", CASES.values(), ids=CASES.keys())
def test_enumeration_keeps_order_and_tokens(vocab, lengths, limit):
    seqs, said = enumerate_inputs(vocab, lengths, limit)
    expected, expected_said = _product_inputs(vocab, lengths, limit)
    assert said == expected_said
    assert seqs == expected
    assert all(type(s) is list for s in seqs)
    for got, want in zip(seqs, expected):  # the vocabulary's own objects, not copies or numpy scalars of them
        assert all(a is b for a, b in zip(got, want)), (got, want)


def test_every_sequence_of_a_length_once_last_position_fastest():
    seqs, said = enumerate_inputs(["a", "b"], [3])
    assert said == {"3": "all 8"}
    assert ["".join(s) for s in seqs] == ["aaa", "aab", "aba", "abb", "baa", "bab", "bba", "bbb"]
