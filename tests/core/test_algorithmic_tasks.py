"""The algorithmic task family: the vectorised generator agrees with the step-by-step Python truth on every
task, data is reproducible from the seed, and a few tasks match closed forms written here by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from crosspatch.zoo.algorithmic import (
    ALGORITHMIC_TASKS, AlgorithmicTaskError, algorithmic_tasks, get_algorithmic_task,
)

NAMES = [t.name for t in ALGORITHMIC_TASKS]


def test_catalogue_size_and_names():
    tasks = algorithmic_tasks()
    assert len(tasks) >= 30
    assert len(set(NAMES)) == len(NAMES)
    mips = [t.mips_name for t in ALGORITHMIC_TASKS if t.mips_name]
    assert len(mips) == 61 and "Newton_Magnetic" not in mips
    for t in ALGORITHMIC_TASKS:
        assert get_algorithmic_task(t.name) is t
        if t.mips_name:
            assert get_algorithmic_task(t.mips_name) is t


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(AlgorithmicTaskError) as err:
        get_algorithmic_task("parity-lst3")
    msg = str(err.value)
    assert "'parity-lst3'" in msg and "did you mean 'parity-last3'" in msg and "add-mod-8" in msg


@pytest.mark.parametrize("name", NAMES)
def test_generator_agrees_with_truth(name):
    task = get_algorithmic_task(name)
    x, y = task.sample(48, 13, seed=3, split="test")
    assert x.shape == (48, 13, task.input_dim) and x.dtype == torch.float32 and y.dtype == torch.long
    assert [task.truth(row) for row in x] == y.tolist()
    for i in range(task.input_dim):  # symbols stay in the alphabet
        assert x[..., i].min() >= task.low[i] and x[..., i].max() < task.low[i] + task.alphabet[i]
    if task.output_kind == "classes":
        assert 0 <= int(y.min()) and int(y.max()) < task.n_classes
    # exhaustively on every sequence of the longest length with at most 1024 of them
    length = 1
    while task.n_sequences(length + 1) <= 1024:
        length += 1
    xa, ya = task.all_sequences(length)
    assert xa.shape[0] == task.n_sequences(length) == len({tuple(r.flatten().tolist()) for r in xa})
    assert [task.truth(row) for row in xa] == ya.tolist()


def test_sampling_is_seeded():
    task = get_algorithmic_task("add-mod-5")
    a, b = task.sample(32, 10, seed=7), task.sample(32, 10, seed=7)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(task.sample(32, 10, seed=8)[0], a[0])
    assert not torch.equal(task.sample(32, 10, seed=7, split="test")[0], a[0])
    with pytest.raises(AlgorithmicTaskError, match="split"):
        task.sample(4, 3, split="valid")


def _bits(n: int, width: int) -> list[int]:
    return [(n >> i) & 1 for i in range(width)]  # least significant first


def test_closed_forms():
    rng = np.random.default_rng(0)
    # binary addition: the output bits are those of a + b (mod 2^width)
    add = get_algorithmic_task("binary-addition")
    for a, b in rng.integers(0, 1 << 12, size=(20, 2)).tolist():
        out = add.truth(list(zip(_bits(a, 12), _bits(b, 12))))
        assert sum(bit << i for i, bit in enumerate(out)) == (a + b) % (1 << 12)
    # base-5 addition, same with digits
    add5 = get_algorithmic_task("base-5-addition")
    digits = lambda n: [(n // 5 ** i) % 5 for i in range(6)]  # noqa: E731
    for a, b in rng.integers(0, 5 ** 6, size=(20, 2)).tolist():
        out = add5.truth(list(zip(digits(a), digits(b))))
        assert sum(d * 5 ** i for i, d in enumerate(out)) == (a + b) % 5 ** 6
    # division by 3 and 7: the streamed quotient bits (most significant first) read as a number are n // d
    for d in (3, 7):
        task = get_algorithmic_task(f"div-{d}")
        for n in rng.integers(0, 1 << 10, size=20).tolist():
            msb_first = _bits(n, 10)[::-1]
            q = task.truth(msb_first)
            assert int("".join(map(str, q)), 2) == n // d
    rem = get_algorithmic_task("div-3-remainder")
    assert rem.truth([1, 1, 0, 1]) == [1, 0, 0, 1]  # 1, 3, 6, 13 mod 3
    # the examples of MIPS's dataset descriptions
    assert get_algorithmic_task("Div_3").truth([1, 0, 0, 0, 0, 1, 0]) == [0, 0, 1, 0, 1, 1, 0]
    assert get_algorithmic_task("Div_5").truth([1, 1, 0, 1, 1, 1, 0]) == [0, 0, 1, 0, 1, 1, 0]


def test_hand_written_outputs():
    t = get_algorithmic_task
    assert t("parity-last3").truth([1, 0, 1, 1, 1]) == [1, 1, 0, 0, 1]
    assert t("sum-last2").truth([5, 7, 1]) == [5, 12, 8]
    assert t("prev2").truth([4, 5, 6, 7]) == [0, 0, 4, 5]
    assert t("diff-last2").truth([-3, 4]) == [-3, 7]
    assert t("diff-abs-values").truth([-3, 2]) == [3, -1]
    assert t("majority-0-2").truth([2, 1, 1, 2, 0]) == [2, 1, 1, 1, 1]  # ties to the lower symbol
    assert t("balanced-parenthesis").truth([0, 1, 1, 0, 0, 1]) == [0, 1, 0, 0, 0, 0]  # never recovers below 0
    assert t("paren-depth").truth([0, 0, 1, 1, 1]) == [1, 2, 1, 0, -1]
    assert t("alternating-last3").truth([1, 0, 1, 1, 0, 1]) == [0, 1, 1, 0, 0, 1]  # 0 before the start
    assert t("bit-palindrome").truth([1, 0, 1, 1]) == [1, 0, 1, 0]
    assert t("previous-equals-current").truth([0, 3, 3]) == [1, 0, 1]  # MIPS: a 0 before the start
    assert t("dithering").truth([10, 10, 10, 4, 15]) == [0, 1, 1, 0, 1]  # floor(10, 20, 30, 34, 49 / 15) steps
    assert t("newton-freebody").truth([1, 0, -2]) == [1, 2, 1]
    assert t("newton-spring").truth([1, 0, 0]) == [1, 1, 0]
    assert t("bitwise-xor").truth([(1, 1), (0, 1)]) == [0, 1]
    assert t("parity-bits-mod2").truth([1, 1, 1]) == [0, 1, 0]
    assert t("add-mod-4").truth([3, 3, 2]) == [3, 2, 0]


def test_truth_checks_steps():
    with pytest.raises(AlgorithmicTaskError, match="2 input stream"):
        get_algorithmic_task("bitwise-and").truth([1, 0])
    with pytest.raises(AlgorithmicTaskError, match="0..1, not 2"):
        get_algorithmic_task("parity-all").truth([2])


def test_all_sequences_refuses_large():
    with pytest.raises(AlgorithmicTaskError, match="use sample"):
        get_algorithmic_task("sum-all").all_sequences(12)


def test_every_sequence_is_the_product_of_the_steps_in_order():
    """One enumeration serves tasks and MIPS: itertools.product over a task's steps, written out here."""
    import itertools

    from crosspatch.methods.mips.inputs import Alphabet, all_sequences
    from crosspatch.zoo.algorithmic.task import every_sequence

    task = next(t for t in ALGORITHMIC_TASKS if t.input_dim == 2 and min(t.low) == 0)
    assert task.steps == tuple(itertools.product(range(task.alphabet[0]), range(task.alphabet[1])))
    expected = [list(seq) for seq in itertools.product(task.steps, repeat=3)]
    assert every_sequence(task.steps, 3).tolist() == [[list(s) for s in seq] for seq in expected]
    assert task.all_sequences(3)[0].long().tolist() == every_sequence(task.steps, 3).tolist()
    assert np.array_equal(all_sequences(Alphabet(task.steps), 3), every_sequence(task.steps, 3))
    assert every_sequence(task.steps, 0).shape == (1, 0, 2)
    shifted = get_algorithmic_task(next(t.name for t in ALGORITHMIC_TASKS if any(t.low)))
    assert min(v for step in shifted.steps for v in step) == min(shifted.low)
