"""The algorithmic task family: MIPS's RNN benchmark tasks and a few more, each with its ground truth.

    from crosspatch.zoo.algorithmic import get_algorithmic_task, algorithmic_tasks
    task = get_algorithmic_task("add-mod-5")           # or its MIPS name, "Add_Mod_5"
    x, y = task.sample(1000, length=10, seed=0)        # x [1000, 10, 1] float, y [1000, 10] long
    task.truth([1, 4, 3])                              # [1, 0, 3]: the Python oracle

Names are the MIPS benchmark's (Michaud et al. 2024, arXiv 2402.05110, the 62 tasks of its table) in
lower case with hyphens (``Bitwise_Xor`` -> ``bitwise-xor``); lookups accept either spelling. The task
definitions follow the datasets of the paper's repository (ranges, "0 before the first step", ties of
the majority towards the lower symbol, division streaming the dividend's most significant bit first,
base-b addition least significant digit first). Differences, and why:

- ``Newton_Magnetic`` is left out: its output is a 2-d position and :class:`TaskRNN` has one output
  per step. 61 of MIPS's 62 tasks are here.
- Outputs that are a small alphabet (bits, digits, residues, majority symbols: at most 10 values) are
  ``"classes"`` trained with cross-entropy; outputs that are unbounded or signed integers (sums,
  previous values, differences, positions) are ``"value"`` trained as a regression and rounded, as
  MIPS trains every task.
- ``Bit_Palindrome`` plants a palindromic prefix of random length in most sequences (as the paper's
  generator does) since random bits are rarely palindromes.
- Ours, not in MIPS: ``paren-depth`` (the running depth of the parentheses), ``div-3-remainder`` (the
  remainder of the streamed binary dividend), ``bit-shift-right-2`` (the bit two steps back) and
  ``sign-current`` (the sign of a signed integer).
"""

from __future__ import annotations

import math
from collections import deque
from typing import Callable

import numpy as np

from ..store import did_you_mean
from .task import AlgorithmicTask, AlgorithmicTaskError, Step

__all__ = ["algorithmic_tasks", "get_algorithmic_task", "ALGORITHMIC_TASKS"]

Rule = Callable[[list[Step]], list[int]]
Labels = Callable[[np.ndarray], np.ndarray]


# ---------------------------------------------------------------------------- vectorised helpers


def _shift(v: np.ndarray, k: int) -> np.ndarray:
    """``v [n, T]`` delayed by ``k`` steps, zeros before the start."""
    if k == 0:
        return v
    out = np.zeros_like(v)
    if k < v.shape[1]:
        out[:, k:] = v[:, :-k]
    return out


def _window(v: np.ndarray, k: int) -> np.ndarray:
    """Sum of the last ``k`` values at every step (zeros before the start)."""
    c = np.cumsum(v, axis=1)
    return c - _shift(c, k)


def _s(x: np.ndarray, i: int = 0) -> np.ndarray:
    return x[:, :, i]


# ---------------------------------------------------------------------------- Python rules (step by step)


def _first(steps: list[Step]) -> list[int]:
    return [s[0] for s in steps]


def _running(update: Callable[[int, int], tuple[int, int]], start: int) -> Rule:
    """A rule keeping one integer state: ``state, out = update(state, x)`` at every step."""

    def rule(steps: list[Step]) -> list[int]:
        state, out = start, []
        for a in _first(steps):
            state, y = update(state, a)
            out.append(y)
        return out

    return rule


def _recent(k: int, fn: Callable[[list[int]], int]) -> Rule:
    """A rule of the last ``k`` inputs (oldest first, zeros before the start)."""

    def rule(steps: list[Step]) -> list[int]:
        buf = deque([0] * k, maxlen=k)
        out = []
        for a in _first(steps):
            buf.append(a)
            out.append(fn(list(buf)))
        return out

    return rule


def _base_addition_rule(base: int) -> Rule:
    def rule(steps: list[Step]) -> list[int]:
        carry, out = 0, []
        for a, b in steps:
            total = a + b + carry
            out.append(total % base)
            carry = total // base
        return out

    return rule


def _base_addition_labels(base: int) -> Labels:
    def labels(x: np.ndarray) -> np.ndarray:
        total = _s(x, 0) + _s(x, 1)
        y = np.zeros_like(total)
        carry = np.zeros(x.shape[0], dtype=np.int64)
        for t in range(x.shape[1]):
            s = total[:, t] + carry
            y[:, t], carry = s % base, (s >= base).astype(np.int64)
        return y

    return labels


def _majority_rule(n_symbols: int) -> Rule:
    def rule(steps: list[Step]) -> list[int]:
        counts, out = [0] * n_symbols, []
        for a in _first(steps):
            counts[a] += 1
            best = max(counts)
            out.append(next(s for s in range(n_symbols) if counts[s] == best))
        return out

    return rule


def _majority_labels(n_symbols: int) -> Labels:
    def labels(x: np.ndarray) -> np.ndarray:
        counts = np.stack([np.cumsum(_s(x) == s, axis=1) for s in range(n_symbols)], axis=-1)
        return counts.argmax(-1)  # argmax takes the first (lowest) symbol on ties

    return labels


def _divide_rule(d: int, remainder: bool = False) -> Rule:
    def rule(steps: list[Step]) -> list[int]:
        r, out = 0, []
        for a in _first(steps):
            v = 2 * r + a
            r = v % d
            out.append(r if remainder else v // d)
        return out

    return rule


def _divide_labels(d: int, remainder: bool = False) -> Labels:
    """Bit ``t`` of the quotient is ``floor(N_t / d) mod 2`` with ``N_t`` the prefix read as a binary
    number (most significant bit first), which only needs ``N_t mod 2d``."""

    def labels(x: np.ndarray) -> np.ndarray:
        m = 3 if remainder else 2 * d
        n = np.zeros(x.shape[0], dtype=np.int64)
        y = np.zeros(x.shape[:2], dtype=np.int64)
        for t in range(x.shape[1]):
            n = (2 * n + x[:, t, 0]) % m
            y[:, t] = n if remainder else n // d
        return y

    return labels


def _dot_rule(steps: list[Step]) -> list[int]:
    p, out = 0, []
    for a, b in steps:
        p ^= a & b
        out.append(p)
    return out


def _palindrome_rule(steps: list[Step]) -> list[int]:
    seq = _first(steps)
    return [int(seq[: t + 1] == seq[: t + 1][::-1]) for t in range(len(seq))]


def _palindrome_labels(x: np.ndarray) -> np.ndarray:
    v = _s(x)
    return np.stack([(v[:, : t + 1] == v[:, t::-1]).all(axis=1) for t in range(v.shape[1])], axis=1)


def _palindrome_sampler(rng: np.random.Generator, n: int, length: int) -> np.ndarray:
    """Random bits whose first ``L`` (uniform in 2..length) form a palindrome, as MIPS draws them."""
    x = rng.integers(0, 2, size=(n, length))
    if length < 2:
        return x[..., None]
    sizes = rng.integers(2, length + 1, size=n)
    for i, size in enumerate(sizes):
        half = x[i, : (size + 1) // 2]
        x[i, :size] = np.concatenate([half, half[: size // 2][::-1]])
    return x[..., None]


def _balanced_rule(steps: list[Step]) -> list[int]:
    depth, broken, out = 0, False, []
    for a in _first(steps):
        depth += 1 if a == 0 else -1
        broken = broken or depth < 0
        out.append(int(depth == 0 and not broken))
    return out


def _balanced_labels(x: np.ndarray) -> np.ndarray:
    depth = np.cumsum(1 - 2 * _s(x), axis=1)
    return (depth == 0) & (np.minimum.accumulate(depth, axis=1) >= 0)


def _dithering_rule(steps: list[Step]) -> list[int]:
    """Error diffusion: carry the brightness forward, emit 1 and subtract 15 when it reaches 15."""
    acc, out = 0, []
    for a in _first(steps):
        acc += a
        out.append(int(acc >= 15))
        acc -= 15 * out[-1]
    return out


def _dithering_labels(x: np.ndarray) -> np.ndarray:
    level = np.cumsum(_s(x), axis=1) // 15
    return level - _shift(level, 1)


def _newton_rule(kind: str) -> Rule:
    def rule(steps: list[Step]) -> list[int]:
        p = v = 0
        out = []
        for a in _first(steps):
            force = {"freebody": a, "gravity": a - 1, "spring": a - p}[kind]
            v += force
            p += v
            out.append(p)
        return out

    return rule


def _newton_labels(kind: str) -> Labels:
    def labels(x: np.ndarray) -> np.ndarray:
        a = _s(x)
        if kind == "freebody":
            return np.cumsum(np.cumsum(a, axis=1), axis=1)
        if kind == "gravity":
            return np.cumsum(np.cumsum(a - 1, axis=1), axis=1)
        # spring: the state (p, v) evolves by the matrix [[0, 1], [-1, 1]] on (p, v) plus the force
        p = np.zeros(a.shape[0], dtype=np.int64)
        v = np.zeros_like(p)
        y = np.zeros_like(a)
        for t in range(a.shape[1]):
            p, v = v + a[:, t], v - p + a[:, t]
            y[:, t] = p
        return y

    return labels


# ---------------------------------------------------------------------------- the catalogue


def _mips(name: str) -> str:
    return name.lower().replace("_", "-")


def _build() -> list[AlgorithmicTask]:
    T: list[AlgorithmicTask] = []

    def add(mips_name: str | None, description: str, alphabet: tuple[int, ...], rule: Rule, labels: Labels, *,
            name: str | None = None, kind: str = "classes", n_classes: int | None = 2,
            low: tuple[int, ...] | None = None, sampler=None) -> None:
        T.append(AlgorithmicTask(
            name=name or _mips(mips_name or ""), description=description, alphabet=alphabet, rule=rule,
            labels=labels, output_kind=kind, n_classes=n_classes if kind == "classes" else None, low=low,
            mips_name=mips_name, sampler=sampler,
        ))

    # addition of two digit streams, least significant digit first (the carry is the state)
    add("Binary_Addition", "sum of two binary numbers streamed least significant bit first", (2, 2),
        _base_addition_rule(2), _base_addition_labels(2))
    for b in range(3, 8):
        add(f"Base_{b}_Addition", f"sum of two base-{b} numbers streamed least significant digit first",
            (b, b), _base_addition_rule(b), _base_addition_labels(b), n_classes=b)

    # bitwise operations of two bit streams (no state)
    for op, fn in (("Xor", lambda a, b: a ^ b), ("Or", lambda a, b: a | b), ("And", lambda a, b: a & b)):
        add(f"Bitwise_{op}", f"bitwise {op.lower()} of two bit streams", (2, 2),
            (lambda f: lambda steps: [f(a, b) for a, b in steps])(fn),
            (lambda f: lambda x: f(_s(x, 0), _s(x, 1)))(fn))
    add("Bitwise_Not", "not of the current bit", (2,), lambda steps: [1 - a for a in _first(steps)],
        lambda x: 1 - _s(x))

    # parities and counters
    for k in (2, 3, 4):
        add(f"Parity_Last{k}", f"parity of the last {k} bits", (2,), _recent(k, lambda w: sum(w) % 2),
            (lambda k: lambda x: _window(_s(x), k) % 2)(k))
    add("Parity_All", "parity of all bits so far", (2,), _running(lambda p, a: (p ^ a, p ^ a), 0),
        lambda x: np.cumsum(_s(x), axis=1) % 2)
    add("Parity_Zeros", "parity of the number of zeros so far", (2,),
        _running(lambda p, a: (p ^ (a == 0), p ^ (a == 0)), 0), lambda x: np.cumsum(_s(x) == 0, axis=1) % 2)
    add("Evens_Counter", "number of even digits so far", (10,),
        _running(lambda c, a: (c + (a % 2 == 0), c + (a % 2 == 0)), 0),
        lambda x: np.cumsum(_s(x) % 2 == 0, axis=1), kind="value")

    # sums, copies and differences of integers
    add("Sum_All", "running sum of integers in 0..99", (100,), _running(lambda s, a: (s + a, s + a), 0),
        lambda x: np.cumsum(_s(x), axis=1), kind="value")
    for k in range(2, 8):
        add(f"Sum_Last{k}", f"sum of the last {k} integers (0..99)", (100,), _recent(k, sum),
            (lambda k: lambda x: _window(_s(x), k))(k), kind="value")
    add("Current_Number", "the current integer (0..99)", (100,), _first, lambda x: _s(x), kind="value")
    for k in range(1, 6):
        add(f"Prev{k}", f"the integer {k} step(s) back (0 before the start)", (100,),
            _recent(k + 1, lambda w: w[0]), (lambda k: lambda x: _shift(_s(x), k))(k), kind="value")
    add("Previous_Equals_Current", "whether the current integer (0..7) equals the previous one", (8,),
        _recent(2, lambda w: int(w[0] == w[1])), lambda x: _s(x) == _shift(_s(x), 1))
    signed = dict(kind="value", low=(-100,))
    add("Diff_Last2", "current minus previous integer (-100..99)", (200,), _recent(2, lambda w: w[1] - w[0]),
        lambda x: _s(x) - _shift(_s(x), 1), **signed)
    add("Abs_Diff", "absolute difference of the current and previous integer", (200,),
        _recent(2, lambda w: abs(w[1] - w[0])), lambda x: np.abs(_s(x) - _shift(_s(x), 1)), **signed)
    add("Abs_Current", "absolute value of the current integer", (200,), lambda st: [abs(a) for a in _first(st)],
        lambda x: np.abs(_s(x)), **signed)
    add("Diff_Abs_Values", "absolute value of the current minus that of the previous integer", (200,),
        _recent(2, lambda w: abs(w[1]) - abs(w[0])), lambda x: np.abs(_s(x)) - np.abs(_shift(_s(x), 1)), **signed)
    add("Min_Seen", "smallest integer (0..9) so far", (10,), _running(lambda m, a: (min(m, a),) * 2, 10 ** 9),
        lambda x: np.minimum.accumulate(_s(x), axis=1), kind="value")
    add("Max_Seen", "largest integer (0..99) so far", (100,), _running(lambda m, a: (max(m, a),) * 2, -1),
        lambda x: np.maximum.accumulate(_s(x), axis=1), kind="value")

    # majorities (ties towards the lower symbol)
    for k in (1, 2, 3):
        add(f"Majority_0_{k}", f"the most frequent symbol of 0..{k} so far (ties: the lower)", (k + 1,),
            _majority_rule(k + 1), _majority_labels(k + 1), n_classes=k + 1)

    # detectors of the current symbol
    add("Evens_Detector", "whether the current digit is even", (10,), lambda st: [int(a % 2 == 0) for a in _first(st)],
        lambda x: _s(x) % 2 == 0)
    add("Perfect_Square_Detector", "whether the current integer (0..19) is a perfect square", (20,),
        lambda st: [int(math.isqrt(a) ** 2 == a) for a in _first(st)], lambda x: np.isin(_s(x), [0, 1, 4, 9, 16]))

    # patterns over the whole prefix
    add("Bit_Palindrome", "whether the bits so far read the same backwards", (2,), _palindrome_rule,
        _palindrome_labels, sampler=_palindrome_sampler)
    add("Balanced_Parenthesis", "whether the prefix is balanced (0 opens, 1 closes, never below 0)", (2,),
        _balanced_rule, _balanced_labels)
    add("Parity_Bits_Mod2", "parity of the step index (0, 1, 0, 1 ... whatever the bits)", (2,),
        lambda st: [t % 2 for t in range(len(st))], lambda x: np.broadcast_to(np.arange(x.shape[1]) % 2, x.shape[:2]))
    add("Alternating_Last3", "whether the last 3 bits are 010 or 101", (2,),
        _recent(3, lambda w: int(w in ([0, 1, 0], [1, 0, 1]))),
        lambda x: (_s(x) != _shift(_s(x), 1)) & (_shift(_s(x), 1) != _shift(_s(x), 2)))
    add("Alternating_Last4", "whether the last 4 bits are 0101 or 1010", (2,),
        _recent(4, lambda w: int(w in ([0, 1, 0, 1], [1, 0, 1, 0]))),
        lambda x: ((_s(x) != _shift(_s(x), 1)) & (_shift(_s(x), 1) != _shift(_s(x), 2))
                   & (_shift(_s(x), 2) != _shift(_s(x), 3))))
    add("Bit_Shift_Right", "the previous bit (0 at the first step)", (2,), _recent(2, lambda w: w[0]),
        lambda x: _shift(_s(x), 1))
    add("Bit_Dot_Prod_Mod2", "dot product of two bit streams so far, mod 2", (2, 2),
        _dot_rule,
        lambda x: np.cumsum(_s(x, 0) * _s(x, 1), axis=1) % 2)
    # long division of a binary number streamed most significant bit first: the quotient bit
    for d in (3, 5, 7):
        add(f"Div_{d}", f"quotient bit of the streamed binary dividend divided by {d}", (2,), _divide_rule(d),
            _divide_labels(d))
    for k in range(3, 9):
        add(f"Add_Mod_{k}", f"running sum of integers 0..{k - 1}, mod {k}", (k,),
            _running(lambda s, a, k=k: ((s + a) % k,) * 2, 0), (lambda k: lambda x: np.cumsum(_s(x), axis=1) % k)(k),
            n_classes=k)
    add("Dithering", "error-diffusion dithering of brightness 0..15 to one bit", (16,), _dithering_rule,
        _dithering_labels)
    forces = dict(kind="value", low=(-10,))
    add("Newton_Freebody", "position of a unit mass pushed by integer forces -10..10", (21,),
        _newton_rule("freebody"), _newton_labels("freebody"), **forces)
    add("Newton_Gravity", "position of a unit mass under the forces and a gravity of -1", (21,),
        _newton_rule("gravity"), _newton_labels("gravity"), **forces)
    add("Newton_Spring", "position of a unit mass under the forces and a unit spring to 0", (21,),
        _newton_rule("spring"), _newton_labels("spring"), **forces)

    # ours (not in the MIPS table)
    add(None, "depth of the parentheses so far (0 opens, 1 closes; may go negative)", (2,),
        _running(lambda d, a: (d + 1 - 2 * a,) * 2, 0), lambda x: np.cumsum(1 - 2 * _s(x), axis=1),
        name="paren-depth", kind="value")
    add(None, "remainder mod 3 of the binary dividend streamed most significant bit first", (2,),
        _divide_rule(3, remainder=True), _divide_labels(3, remainder=True), name="div-3-remainder", n_classes=3)
    add(None, "the bit two steps back (0 before the start)", (2,), _recent(3, lambda w: w[0]),
        lambda x: _shift(_s(x), 2), name="bit-shift-right-2")
    add(None, "sign (-1, 0, 1) of the current integer (-100..99)", (200,),
        lambda st: [(a > 0) - (a < 0) for a in _first(st)], lambda x: np.sign(_s(x)), name="sign-current",
        kind="value", low=(-100,))
    return T


ALGORITHMIC_TASKS: tuple[AlgorithmicTask, ...] = tuple(_build())
_BY_NAME = {t.name: t for t in ALGORITHMIC_TASKS}
_BY_MIPS = {t.mips_name: t for t in ALGORITHMIC_TASKS if t.mips_name}


def algorithmic_tasks() -> dict[str, AlgorithmicTask]:
    """Every algorithmic task by name, in catalogue order."""
    return dict(_BY_NAME)


def get_algorithmic_task(name: str) -> AlgorithmicTask:
    """The task called ``name`` (ours, e.g. ``"add-mod-5"``, or MIPS's, ``"Add_Mod_5"``).

    An unknown name raises :class:`AlgorithmicTaskError` naming it and listing the known ones.
    """
    if isinstance(name, AlgorithmicTask):
        return name
    if name in _BY_NAME:
        return _BY_NAME[name]
    if name in _BY_MIPS:
        return _BY_MIPS[name]
    if isinstance(name, str) and _mips(name) in _BY_NAME:
        return _BY_NAME[_mips(name)]
    raise AlgorithmicTaskError(
        f"no algorithmic task named {name!r}{did_you_mean(name, _BY_NAME)}; the tasks are: {', '.join(_BY_NAME)}"
    )
