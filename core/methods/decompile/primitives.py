"""The RASP-like primitives a decompiled program is written in, as plain Python source.

:data:`INTERPRETER` is the text every emitted ``program.py`` starts with (so the file runs with no
crosspatch import) *and* what matching and verification evaluate (:func:`interpreter`), so a head is
matched against exactly the semantics the emitted program runs.

Sequences carry a start position 0 (``BOS``); ``causal=True`` restricts keys to ``k <= q`` (decoder
models). Every variable is a list with one value per position; ``None`` is "no value" (a categorical
variable tracr leaves empty, e.g. at the start position).

- ``select(keys, queries, predicate, bos, causal)``: ``sel[q][k]`` is ``predicate(keys[k], queries[q])``
  over the non-start keys; the start key is selected always (``bos="always"``: a selector width's
  reference), only when nothing else is (``"default"``: tracr's attend-to-BOS default) or never.
- ``numerical_aggregate(sel, values)``: the mean of the selected values (``None`` counts as 0).
- ``categorical_aggregate(sel, values)``: the selected non-start keys' value when they agree, else ``None``.
- ``indicator(values, target)``: 1 where the value is ``target``, else 0 (a numerical aggregate's values).
- ``lookup(table, *variables)``: a position-wise map given as a table over the discrete values seen;
  a numerical key not in the table takes the nearest key's value (float rounding of the network).
"""

from __future__ import annotations

from typing import Any

__all__ = ["INTERPRETER", "PREDICATES", "interpreter"]

PREDICATES = ("EQ", "TRUE", "LT", "LEQ", "GT", "GEQ", "NEQ")

INTERPRETER = '''\
BOS = "BOS"

PREDICATES = {
    "EQ": lambda k, q: k == q,
    "LT": lambda k, q: k < q,
    "LEQ": lambda k, q: k <= q,
    "GT": lambda k, q: k > q,
    "GEQ": lambda k, q: k >= q,
    "NEQ": lambda k, q: k != q,
    "TRUE": lambda k, q: True,
}


def _holds(predicate, k, q):
    if predicate == "TRUE":
        return True
    if k is None or q is None:
        return False
    try:
        return bool(PREDICATES[predicate](k, q))
    except TypeError:  # values of different kinds do not compare
        return False


def select(keys, queries, predicate, bos="default", causal=False):
    """sel[q][k]: whether query position q reads key position k (position 0 is the start)."""
    n = len(keys)
    sel = []
    for q in range(n):
        row = [False] + [(not causal or k <= q) and _holds(predicate, keys[k], queries[q]) for k in range(1, n)]
        if bos == "always" or (bos == "default" and not any(row)):
            row[0] = True
        sel.append(row)
    return sel


def numerical_aggregate(sel, values):
    """Per query: the mean of the selected values (None counts as 0)."""
    out = []
    for row in sel:
        picked = [values[k] or 0 for k, on in enumerate(row) if on]
        out.append(sum(picked) / len(picked) if picked else 0)
    return out


def categorical_aggregate(sel, values):
    """Per query: the value of the selected non-start keys when they all agree, else None."""
    out = []
    for row in sel:
        picked = {values[k] for k, on in enumerate(row) if on and k > 0}
        out.append(picked.pop() if len(picked) == 1 else None)
    return out


def indicator(values, target):
    """1 where the value is target, else 0."""
    return [1 if v == target else 0 for v in values]


def _key(value):
    return round(value, 4) if isinstance(value, float) else value


def _nearest(table, key):
    best, best_d = None, None
    for k in table:
        d = 0.0
        for a, b in zip(k, key):
            if a == b:
                continue
            if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
                d = max(d, abs(a - b))
            else:
                d = None
                break
        if d is not None and (best_d is None or d < best_d):
            best, best_d = k, d
    return table[best] if best is not None else None


def lookup(table, *variables):
    """Position-wise map: table[(v1, v2, ...)] for the values at each position."""
    out = []
    for vals in zip(*variables):
        key = tuple(_key(v) for v in vals)
        out.append(table[key] if key in table else _nearest(table, key))
    return out
'''


def interpreter() -> dict[str, Any]:
    """The functions of :data:`INTERPRETER` (``select``, ``numerical_aggregate``, ...), evaluated once."""
    global _NAMESPACE
    if _NAMESPACE is None:
        namespace: dict[str, Any] = {}
        exec(compile(INTERPRETER, "<decompile interpreter>", "exec"), namespace)
        _NAMESPACE = namespace
    return _NAMESPACE


_NAMESPACE: dict[str, Any] | None = None
