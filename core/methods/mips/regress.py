"""Symbolic regression over integers: a short Python expression equal to a target on every row.

Given integer variables (lattice coordinates of the state, input symbols) and an integer target (the
next coordinate, or the output), candidate families are tried simplest first and the first one exact
on every row wins: a constant; one of the variables; integer-affine (least squares, coefficients rounded, checked exactly);
affine modulo ``m``; Boolean formulas of up to two operators (``^ & |``, with the constant 1 for
negation) when everything is 0/1; ``max``/``min`` of two variables; comparisons of a variable or of a
sum or difference of two with a constant; floor division of an affine form by a small integer. MIPS
uses Boolean and integer symbolic regression in the same role; the families are ours.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable

import numpy as np

__all__ = ["Fit", "fit_expression"]


@dataclass(frozen=True)
class Fit:
    """A Python expression over the variable names and the family it came from."""

    text: str
    family: str


def _affine_text(coefs: list[int], names: list[str], const: int) -> str:
    parts: list[str] = []
    for a, name in zip(coefs, names):
        if a == 0:
            continue
        term = name if abs(a) == 1 else f"{abs(a)} * {name}"
        parts.append(("- " if a < 0 else "+ ") + term)
    if const or not parts:
        parts.append(("- " if const < 0 else "+ ") + str(abs(const)))
    text = " ".join(parts)
    return text[2:] if text.startswith("+ ") else "-" + text[2:]


def _affine(v: np.ndarray, t: np.ndarray) -> tuple[list[int], int] | None:
    if len(t) <= v.shape[1] + 1:
        return None  # as many rows as coefficients: any target fits, so a fit says nothing
    a = np.concatenate([v, np.ones((len(v), 1))], axis=1).astype(np.float64)
    sol = np.linalg.lstsq(a, t.astype(np.float64), rcond=None)[0]
    coefs = np.round(sol).astype(np.int64)
    if np.array_equal(a.astype(np.int64) @ coefs, t):
        return [int(c) for c in coefs[:-1]], int(coefs[-1])
    return None


def _modular(v: np.ndarray, t: np.ndarray, names: list[str], budget: int = 20_000_000) -> Fit | None:
    if t.min() < 0 or t.max() >= 16:
        return None
    for m in range(max(2, int(t.max()) + 1), 17):
        nv = v.shape[1]
        if m ** (nv + 1) * len(t) > budget:  # coefficient grid times rows: keep the search to seconds
            return None
        grid = np.array(list(itertools.product(range(m), repeat=nv)), dtype=np.int64)  # [G, nv]
        lin = v @ grid.T  # [rows, G]
        for c in range(m):
            ok = np.all((lin + c) % m == t[:, None], axis=0)
            if ok.any():
                coefs = [int(x) for x in grid[int(np.argmax(ok))]]
                return Fit(f"({_affine_text(coefs, names, c)}) % {m}", "affine modulo m")
    return None


_BOOL_OPS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "^": np.bitwise_xor, "&": np.bitwise_and, "|": np.bitwise_or,
}


def _boolean(v: np.ndarray, t: np.ndarray, names: list[str]) -> Fit | None:
    if not (np.isin(v, (0, 1)).all() and np.isin(t, (0, 1)).all()):
        return None
    leaves = [(n, v[:, i]) for i, n in enumerate(names)] + [("1", np.ones(len(t), np.int64))]
    level1 = [(f"{a} {op} {b}", fn(x, y)) for (a, x), (b, y) in itertools.combinations(leaves, 2) for op, fn in _BOOL_OPS.items()]
    for text, val in level1:
        if np.array_equal(val, t):
            return Fit(text, "Boolean")
    for (a, x), (b, y) in itertools.product(level1, leaves):
        for op, fn in _BOOL_OPS.items():
            if np.array_equal(fn(x, y), t):
                return Fit(f"({a}) {op} {b}", "Boolean")
    return None


def _pairs(v: np.ndarray, names: list[str]):
    for i, a in enumerate(names):
        yield a, v[:, i]
    for (i, a), (j, b) in itertools.combinations(list(enumerate(names)), 2):
        yield f"{a} + {b}", v[:, i] + v[:, j]
        yield f"{a} - {b}", v[:, i] - v[:, j]
        yield f"{b} - {a}", v[:, j] - v[:, i]


def _nonlinear(v: np.ndarray, t: np.ndarray, names: list[str], budget: int = 2_000_000) -> Fit | None:
    for (i, a), (j, b) in itertools.combinations(list(enumerate(names)), 2):
        for fn, name in ((np.maximum, "max"), (np.minimum, "min")):
            if np.array_equal(fn(v[:, i], v[:, j]), t):
                return Fit(f"{name}({a}, {b})", "max/min")
    if np.isin(t, (0, 1)).all():
        for text, lin in _pairs(v, names):
            values = np.unique(lin)
            if len(values) > 64:
                continue  # a threshold among many values: left to the verifier's failure, not searched
            for c in values:
                for op, fn in ((">", np.greater), (">=", np.greater_equal), ("==", np.equal)):
                    if np.array_equal(fn(lin, c).astype(np.int64), t):
                        return Fit(f"int({text} {op} {int(c)})", "comparison")
    if 5 ** v.shape[1] * len(t) * 17 * 7 > budget * 50:
        return None
    for m in range(2, 9):
        for coefs in itertools.product(range(-2, 3), repeat=v.shape[1]):
            if not any(coefs):
                continue
            lin = v @ np.array(coefs, dtype=np.int64)
            for c in range(-m, m + 1):
                if np.array_equal((lin + c) // m, t):
                    return Fit(f"({_affine_text(list(coefs), names, c)}) // {m}", "floor division")
    return None


def _unique_rows(a: np.ndarray) -> np.ndarray:
    """The distinct rows of integer ``a``, sorted (a lexicographic sort: ``np.unique(axis=0)`` is slow)."""
    if len(a) < 2:
        return a
    s = a[np.lexsort(a.T[::-1])]
    keep = np.concatenate([[True], np.any(s[1:] != s[:-1], axis=1)])
    return s[keep]


def fit_expression(v: np.ndarray, t: np.ndarray, names: list[str]) -> Fit | None:
    """The first expression (simplest family first) over ``names`` equal to ``t`` on every row of
    ``v [rows, len(names)]``; ``None`` if no family fits."""
    t = np.asarray(t, dtype=np.int64)
    v = np.asarray(v, dtype=np.int64).reshape(len(t), len(names))
    rows = _unique_rows(np.concatenate([v, t[:, None]], axis=1))
    v, t = rows[:, :-1], rows[:, -1]
    if len(_unique_rows(v)) < len(v):
        return None  # the same variables lead to different targets: no function of them fits
    if len(np.unique(t)) == 1:
        return Fit(str(int(t[0])), "constant")
    for i, name in enumerate(names):
        if np.array_equal(v[:, i], t):
            return Fit(name, "variable")
    aff = _affine(v, t)
    if aff is not None:
        return Fit(_affine_text(aff[0], names, aff[1]), "integer affine")
    for family in (_boolean, _modular, _nonlinear):
        fit = family(v, t, names)
        if fit is not None:
            return fit
    return None
