"""Matching kept components to primitives, from what they do on data.

A *trace* maps each variable name to its values, one list per sequence (start position first).
A head is matched to the ``Select(keys, queries, predicate)`` whose uniform attention over the
selection is closest (total variation, averaged over query rows) to the head's attention pattern,
searching every pair of available variables, every predicate of :data:`.primitives.PREDICATES` and
the three start-position rules; then to the ``Aggregate`` of an available variable (numerical:
mean of a numerical variable or of an indicator ``var == value``; categorical: copy) that
reproduces the variable it writes. An MLP is matched to a lookup table over the smallest set of
available variables its output is a function of (fewest table entries among equally small sets).
"""

from __future__ import annotations

import itertools
from collections import Counter, defaultdict
from typing import Any, Sequence

import numpy as np

from .primitives import PREDICATES, interpreter
from .program import Lookup, SelectAggregate

__all__ = ["Trace", "evaluate", "match_head", "match_head_codes", "match_lookup", "match_select", "rank_selects"]

Trace = dict[str, list[list[Any]]]

_BOS_RULES = ("default", "always", "never")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def _codes(trace: Trace, names: Sequence[str]) -> dict[str, list[np.ndarray]] | None:
    """Order-preserving float codes of the variables (NaN: ``None``), over non-start positions; ``None``
    when the variables mix numbers and strings (then only TRUE can hold between them)."""
    seen = {v for n in names for seq in trace[n] for v in seq[1:] if v is not None}
    if all(_is_number(v) for v in seen):
        rank = lambda v: float(v)
    elif all(isinstance(v, str) for v in seen):
        order = {v: float(i) for i, v in enumerate(sorted(seen))}
        rank = order.__getitem__
    else:
        return None
    return {n: [np.array([np.nan] + [np.nan if v is None else rank(v) for v in seq[1:]]) for seq in trace[n]] for n in names}


def _by_length(patterns: Sequence[np.ndarray]) -> dict[int, list[int]]:
    groups: dict[int, list[int]] = defaultdict(list)
    for i, p in enumerate(patterns):
        groups[p.shape[-1]].append(i)
    return groups


def match_select(patterns: Sequence[np.ndarray], trace: Trace, candidates: Sequence[str], *,
                 causal: bool = False, query_only: Sequence[str] = ()) -> tuple[str, str, str, str, float]:
    """Best ``(keys, queries, predicate, bos_rule, fit)`` for attention ``patterns`` (one ``[T, T]``
    array per sequence); variables in ``query_only`` (index offsets) serve as queries only. ``fit`` is
    the mean over non-start query rows of ``1 - TV(pattern row, uniform attention over the selection)``
    (1: the head attends exactly uniformly to what the selector selects)."""
    return rank_selects(patterns, trace, candidates, causal=causal, query_only=query_only, top=1)[0]


def rank_selects(patterns: Sequence[np.ndarray], trace: Trace, candidates: Sequence[str], *, causal: bool = False,
                 query_only: Sequence[str] = (), top: int = 10) -> list[tuple[str, str, str, str, float]]:
    """The ``top`` selects of :func:`match_select`, best first (distinct fits: selects that select the
    same keys on these sequences are one)."""
    groups = _by_length(patterns)
    observed = {T: np.stack([patterns[i] for i in idx]).astype(np.float64) for T, idx in groups.items()}
    rows = sum(len(idx) * (T - 1) for T, idx in groups.items())
    scored: dict[tuple, tuple[float, int, tuple]] = {}

    def consider(pred_rows: dict[int, np.ndarray], rank: int, label: tuple) -> None:
        for bos in _BOS_RULES:
            total = 0.0
            for T, r in pred_rows.items():
                r = _final(r, bos)
                count = r.sum(axis=-1, keepdims=True)
                uniform = np.where(count > 0, r / np.maximum(count, 1), 0.0)
                tv = 0.5 * np.abs(observed[T] - uniform).sum(axis=-1)  # 1 where nothing is selected
                total += float((1.0 - np.minimum(tv, 1.0))[:, 1:].sum())
            fit = round(total / max(rows, 1), 9)
            same = b"".join(_final(r, bos).tobytes() for r in pred_rows.values())
            if same not in scored or (fit, -rank) > scored[same][:2]:
                scored[same] = (fit, -rank, (*label, bos))

    def base(T: int) -> np.ndarray:
        r = np.ones((T, T), dtype=bool)
        r[:, 0] = False
        return np.tril(r) if causal else r

    first = candidates[0] if candidates else "tokens"
    consider({T: np.broadcast_to(base(T), (len(idx), T, T)).copy() for T, idx in groups.items()}, 1,
             (first, first, "TRUE"))
    keys_from = [c for c in candidates if c not in set(query_only)]
    for pair_rank, (k, q) in enumerate(itertools.product(keys_from, candidates)):
        codes = _codes(trace, [k, q])
        if codes is None:
            continue
        for p_rank, pred in enumerate(PREDICATES):
            if pred == "TRUE":
                continue
            out = {}
            for T, idx in groups.items():
                K = np.stack([codes[k][i] for i in idx])[:, None, :]
                Q = np.stack([codes[q][i] for i in idx])[:, :, None]
                with np.errstate(invalid="ignore"):
                    r = {"EQ": K == Q, "LT": K < Q, "LEQ": K <= Q, "GT": K > Q, "GEQ": K >= Q,
                         "NEQ": (K != Q) & ~np.isnan(K) & ~np.isnan(Q)}[pred]
                out[T] = r & base(T)
            consider(out, 10 + p_rank + 10 * pair_rank, (k, q, pred))
    ranked = sorted(scored.values(), key=lambda x: x[:2], reverse=True)[:top]
    return [(*label, fit) for fit, _, label in ranked]


def _final(r: np.ndarray, bos: str) -> np.ndarray:
    """A selection matrix with the start-position rule applied (what identifies a select on the data)."""
    r = r.copy()
    if bos == "always":
        r[..., 0] = True
    elif bos == "default":
        r[..., 0] = ~r[..., 1:].any(axis=-1)
    return r


def _agreement(pred: list[list[Any]], obs: list[list[Any]], numerical: bool, tol: float) -> float:
    hit = total = 0
    for p, o in zip(pred, obs):
        for a, b in zip(p[1:], o[1:]):
            total += 1
            if numerical:
                hit += a is not None and b is not None and abs(float(a) - float(b)) <= tol
            else:
                hit += a == b
    return hit / max(total, 1)


def match_head(node: str, patterns: Sequence[np.ndarray], trace: Trace, candidates: Sequence[str], out: str,
               numerical: bool, *, causal: bool = False, tol: float = 0.02) -> SelectAggregate:
    """The Select + Aggregate that best explains head ``node`` writing variable ``out`` (in ``trace``)."""
    fn = interpreter()
    keys, queries, pred, bos, fit = match_select(patterns, trace, candidates, causal=causal)
    sels = [fn["select"](kk, qq, pred, bos, causal) for kk, qq in zip(trace[keys], trace[queries])]
    observed = trace[out]
    best: tuple[float, int, dict] | None = None
    if numerical:
        options: list[tuple[str, Any]] = []
        for name in candidates:
            vals = {v for seq in trace[name] for v in seq if v is not None}
            if vals and all(_is_number(v) for v in vals):
                options.append((name, None))
            options.extend((name, v) for v in sorted(vals, key=repr))
        for rank, (name, target) in enumerate(options):
            values = trace[name] if target is None else [fn["indicator"](s, target) for s in trace[name]]
            pred_vals = [fn["numerical_aggregate"](s, v) for s, v in zip(sels, values)]
            score = _agreement(pred_vals, observed, True, tol)
            if best is None or (score, -rank) > best[:2]:
                best = (score, -rank, {"value": name, "value_of": target})
    else:
        for rank, name in enumerate(candidates):
            copied = [fn["categorical_aggregate"](s, v) for s, v in zip(sels, trace[name])]
            score, extra = _agreement(copied, observed, False, tol), {"value": name}
            if best is None or (score, -rank) > best[:2]:
                best = (score, -rank, extra)
    assert best is not None, f"{node}: no candidate variable to aggregate"
    return SelectAggregate(node=node, out=out, keys=keys, queries=queries, predicate=pred, bos=bos,
                           numerical=numerical, causal=causal, pattern_fit=fit, agreement=best[0], **best[2])


def _group_key(v: Any, numerical: bool) -> Any:
    return round(float(v), 2) if numerical and v is not None else v


def match_lookup(node: str, trace: Trace, candidates: Sequence[str], out: str, numerical: bool, *,
                 max_inputs: int = 3, threshold: float = 1.0) -> Lookup:
    """The lookup table over the fewest ``candidates`` (then the fewest entries) that reproduces ``out``
    on at least ``threshold`` of the non-start positions; the best found if none reaches it."""
    fn = interpreter()
    target = [v for seq in trace[out] for v in seq[1:]]
    best: tuple[tuple, tuple, dict, float] | None = None
    for size in range(1, max_inputs + 1):
        for rank, subset in enumerate(itertools.combinations(candidates, size)):
            keys = [tuple(fn["_key"](v) for v in vals) for vals in zip(*[[v for seq in trace[n] for v in seq[1:]] for n in subset])]
            groups: dict[tuple, Counter] = defaultdict(Counter)
            for k, y in zip(keys, target):
                groups[k][_group_key(y, numerical)] += 1
            hits = sum(c.most_common(1)[0][1] for c in groups.values())
            agreement = hits / max(len(target), 1)
            table = {}
            for k, c in groups.items():
                top = c.most_common(1)[0][0]
                if numerical and top is not None:
                    same = [float(y) for kk, y in zip(keys, target) if kk == k and y is not None and round(float(y), 2) == top]
                    top = round(sum(same) / len(same), 4)
                table[k] = top
            reached = agreement >= threshold
            score = (True, -size, -len(table), -rank) if reached else (False, agreement, -size, -len(table), -rank)
            if best is None or score > best[0]:
                best = (score, subset, table, agreement)
        if best is not None and best[0][0]:
            break
    assert best is not None, f"{node}: no candidate inputs"
    return Lookup(node=node, out=out, inputs=tuple(best[1]), table=best[2], numerical=numerical, agreement=best[3])


def evaluate(op: Any, trace: Trace) -> list[list[Any]]:
    """The values the emitted program computes for ``op`` on the sequences of ``trace``."""
    fn = interpreter()
    from .program import Offset

    out = []
    for i in range(len(trace["tokens"])):
        if isinstance(op, Offset):
            out.append([None if v is None else v + op.offset for v in trace[op.source][i]])
        elif isinstance(op, Lookup):
            out.append(fn["lookup"](op.table, *[trace[n][i] for n in op.inputs]))
        else:
            sel = fn["select"](trace[op.keys][i], trace[op.queries][i], op.predicate, op.bos, op.causal)
            if op.numerical:
                values = trace[op.value][i] if op.value_of is None else fn["indicator"](trace[op.value][i], op.value_of)
                out.append(fn["numerical_aggregate"](sel, values))
            else:
                out.append(fn["categorical_aggregate"](sel, trace[op.value][i]))
    return out


def match_head_codes(node: str, patterns: Sequence[np.ndarray], trace: Trace, candidates: Sequence[str],
                     vectors: Sequence[np.ndarray], out: str, *, causal: bool = False, query_only: Sequence[str] = (),
                     top: int = 8) -> tuple[SelectAggregate, list[list[Any]]]:
    """A head of a trained model (no named subspaces), from its writes ``vectors`` (one ``[T, d]`` per
    sequence). The writes are centred per position (what a position-wise constant cannot carry: that
    part is what optimal ablation would keep); for each of the ``top`` selects by pattern fit, each
    candidate aggregate (categorical copy of a variable; numerical mean of a variable or an indicator)
    is scored by the share of that variance it explains (R^2: grouped by the copied value, or linear in
    the mean). The pair with the largest ``pattern_fit * R^2`` is the head's variable (a diffuse head
    fits a broad selection best, but what it writes is read off the keys it attends to most); its
    ``agreement`` is the R^2. Returns the op and the values the program computes for it."""
    fn = interpreter()
    X = np.concatenate([v[1:] for v in vectors]).astype(np.float64)
    pos = np.concatenate([np.arange(1, len(v)) for v in vectors])
    for p in np.unique(pos):
        X[pos == p] -= X[pos == p].mean(axis=0)
    total = float((X**2).sum()) or 1.0
    values_from = [c for c in candidates if c not in set(query_only)]
    best: tuple[float, int, SelectAggregate] | None = None
    for s_rank, (keys, queries, pred, bos, fit) in enumerate(rank_selects(patterns, trace, candidates, causal=causal,
                                                                          query_only=query_only, top=top)):
        sels = [fn["select"](kk, qq, pred, bos, causal) for kk, qq in zip(trace[keys], trace[queries])]
        common = dict(node=node, out=out, keys=keys, queries=queries, predicate=pred, bos=bos, causal=causal,
                      pattern_fit=fit)
        for rank, (r2, op) in enumerate(_aggregates(fn, sels, trace, values_from, X, pos, total, common)):
            score = (round(fit * r2, 9), -(1000 * s_rank + rank))
            if best is None or score > best[:2]:
                op.agreement = r2
                best = (*score, op)
    assert best is not None, f"{node}: no candidate variable to aggregate"
    op = best[2]
    return op, evaluate(op, trace)


def _aggregates(fn: dict, sels: list, trace: Trace, names: Sequence[str], X: np.ndarray, pos: np.ndarray, total: float,
                common: dict):
    """``(R^2, op)`` for every aggregate of ``names`` under the selections ``sels``."""
    for name in names:
        copied = [x for s, v in zip(sels, trace[name]) for x in fn["categorical_aggregate"](s, v)[1:]]
        groups: dict[Any, list[int]] = defaultdict(list)
        for i, c in enumerate(copied):
            groups[(c, int(pos[i]))].append(i)
        within = sum(float(((X[idx] - X[idx].mean(axis=0)) ** 2).sum()) for idx in groups.values())
        yield 1.0 - within / total, SelectAggregate(value=name, numerical=False, **common)
    for name, target in _numerical_options(trace, names):
        values = trace[name] if target is None else [fn["indicator"](s, target) for s in trace[name]]
        mean = np.array([x for s, v in zip(sels, values) for x in fn["numerical_aggregate"](s, v)[1:]], dtype=np.float64)
        for p in np.unique(pos):
            mean[pos == p] -= mean[pos == p].mean()
        denom = float(mean @ mean)
        if denom <= 1e-12:
            continue
        coef = (mean @ X) / denom  # per output dimension, least squares on the centred mean
        resid = float(((X - np.outer(mean, coef)) ** 2).sum())
        yield 1.0 - resid / total, SelectAggregate(value=name, value_of=target, numerical=True, **common)


def _numerical_options(trace: Trace, candidates: Sequence[str]) -> list[tuple[str, Any]]:
    options: list[tuple[str, Any]] = []
    for name in candidates:
        vals = {v for seq in trace[name] for v in seq if v is not None}
        if vals and all(_is_number(v) for v in vals):
            options.append((name, None))
        if len(vals) <= 12:
            options.extend((name, v) for v in sorted(vals, key=repr))
    return options
