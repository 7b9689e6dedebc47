"""ACDC (Conmy et al. 2023): the greedy search over receivers in reverse topological order that removes
(patches) an edge when that changes the metric by less than a threshold, then pruned to the edges on some
input-to-output path of kept edges. Exact edge patching evaluates many candidates per forward (row blocks,
resumed from the clean prefix) and the result is the sequential algorithm's: ``search="speculative"``
(default) runs the candidates in their sequential order, each row assuming a guessed decision for the
ones before it, and keeps the rows up to the first wrong guess; ``"rounds"`` is the earlier batching
(every candidate of a receiver alone, then the running removals). :func:`acdc_sweep` runs several
thresholds on one set of clean, ablated and evaluated runs, each guessing from the one before.
"""

from __future__ import annotations

from typing import Any, Callable, Literal, Sequence

import numpy as np
import torch

from ...results.metrics import Metric, MetricContext, kl_to_clean
from ...results.result import Result
from ..edge_paths import connected
from ..pairs import model_metric
from .graph import EdgeGraph
from .patching import Ablation, EdgePatcher
from .result import _result

Search = Literal["speculative", "rounds"]


class _Evaluator:
    """The metric of the clean run with each edge mask patched (averaged over prompts), row blocks of
    ``batch_size`` rows, resumed from the clean prefix when kept; a mask met before is not run again."""

    def __init__(self, p: EdgePatcher, metric: Metric, batch_size: int, reuse_prefix: bool):
        self.p, self.metric = p, metric
        n = p.n
        self.sizes = p.m.adapter.sizes(p.clean)
        at = metric.positions(MetricContext(torch.arange(n)), self.sizes)
        if reuse_prefix:
            self.kept = p.keep_clean(at)  # also sets p.clean_out
        else:
            self.kept, p.clean_out = None, p._execute(p.clean, output_at=at).output
        self.per = max(1, batch_size // n)  # masks per forward
        self.memo: dict[bytes, float] = {}
        self.rows = 0  # masks evaluated (each n prompts)

    def __call__(self, masks: torch.Tensor) -> torch.Tensor:
        keys = [np.packbits(row.numpy() != 0).tobytes() for row in masks]
        todo = [i for i, k in enumerate(keys) if k not in self.memo]
        p, n = self.p, self.p.n
        for start in range(0, len(todo), self.per):
            idx = todo[start : start + self.per]
            chunk = masks[idx]
            ctx = MetricContext(torch.arange(n).repeat(len(idx)), p.clean_out, None)
            output = p.run(chunk, self.metric.positions(ctx, self.sizes), self.kept)
            ctx.example = ctx.example.to(output.device)
            with torch.inference_mode():
                values = self.metric(output, ctx).double().view(len(idx), n).mean(dim=1).cpu()
            for i, v in zip(idx, values.tolist()):
                self.memo[keys[i]] = v
            self.rows += len(idx)
        return torch.tensor([self.memo[k] for k in keys], dtype=torch.float64)


def _order(g: EdgeGraph) -> list[int]:
    """Every edge in the sequential algorithm's order: receivers in reverse topological order, each one's
    incoming edges from the latest sender back."""
    incoming: dict[int, list[int]] = {}
    for e, (s, r) in enumerate(g.edges):
        incoming.setdefault(r, []).append(e)
    receivers = sorted(incoming, key=lambda r: (EdgeGraph._stage(g.receivers[r]), r), reverse=True)
    return [e for r in receivers for e in sorted(incoming[r], key=lambda e: g.edges[e][0], reverse=True)]


def _score(change: str, values: torch.Tensor, current: float) -> torch.Tensor:
    return values - current if change == "increase" else (values - current).abs()


def _speculative(evaluate: _Evaluator, g: EdgeGraph, order: list[int], threshold: float, change: str,
                 guess: np.ndarray | None) -> tuple[torch.Tensor, float]:
    """The sequential greedy decisions, up to ``evaluate.per`` candidates per forward: row ``m`` removes the
    candidates before it that are guessed removed and candidate ``m``; its value is the sequential one while
    every guess before it holds, so the rows are read in order up to the first wrong guess (that row is still
    right) and the next forward starts after it. The guess for an edge is the last decision about an edge from
    the same sender (a sender that matters tends to matter to every receiver), else ``guess`` (the previous
    threshold's decision in a sweep), else the last decision made."""
    removed = torch.zeros(len(g))
    current = float(evaluate(removed[None])[0])
    i, last = 0, True
    by_sender: dict[int, bool] = {}
    while i < len(order):
        cand = order[i : i + evaluate.per]
        pred, seen, prev = [], dict(by_sender), last
        for e in cand:
            s = g.edges[e][0]
            p = seen[s] if s in seen else bool(guess[e]) if guess is not None else prev
            pred.append(p)
            seen[s], prev = p, p
        masks = removed.repeat(len(cand), 1)
        for m, e in enumerate(cand):
            masks[m, e] = 1
            if pred[m]:
                masks[m + 1 :, e] = 1
        values = evaluate(masks)
        for m, e in enumerate(cand):
            ok = bool(_score(change, values[m : m + 1], current)[0] < threshold)
            if ok:
                removed[e] = 1
                current = float(values[m])
            i, last = i + 1, ok
            by_sender[g.edges[e][0]] = ok
            if ok != pred[m]:
                break
    return removed, current


def _rounds(evaluate: _Evaluator, g: EdgeGraph, threshold: float, change: str) -> tuple[torch.Tensor, float]:
    """Per receiver, rounds of two forwards: every remaining candidate alone against the current circuit,
    then from the first acceptable one ``i`` the running removals ``todo[i]``, ``todo[i:i+2]``, ... accepted
    while each step passes; the first failure is rejected and the next round starts after it."""
    removed = torch.zeros(len(g))
    current = float(evaluate(removed[None])[0])
    order = _order(g)
    by_receiver: dict[int, list[int]] = {}
    for e in order:
        by_receiver.setdefault(g.edges[e][1], []).append(e)
    for todo in by_receiver.values():
        while todo:
            masks = removed.repeat(len(todo), 1)
            masks[torch.arange(len(todo)), torch.tensor(todo)] = 1
            ok = torch.nonzero(_score(change, evaluate(masks), current) < threshold).flatten()
            if len(ok) == 0:
                break
            run = todo[int(ok[0]) :]
            masks = removed.repeat(len(run), 1)
            for j, e in enumerate(run):
                masks[j:, e] = 1
            values = evaluate(masks)
            j = 0
            while j < len(run) and _score(change, values[j : j + 1], current)[0] < threshold:
                removed[run[j]] = 1
                current = float(values[j])
                j += 1
            todo = run[j + 1 :]
    return removed, current


def _circuit(p: EdgePatcher, evaluate: _Evaluator, metric: Metric, removed: torch.Tensor, current: float, prune: bool,
             extra: dict) -> Result:
    g = p.graph
    kept = 1 - removed.numpy()
    pruned: list[str] = []
    if prune:
        linked = connected(g, kept)
        pruned = [name for name, before, after in zip(g.edge_names, kept, linked) if before and not after]
        if pruned:
            kept = linked
            current = float(evaluate(torch.as_tensor(1 - kept, dtype=removed.dtype)[None])[0])
    return _result(p, kept, "acdc", metric, {
        **extra, "final_metric": current, "kept": [name for name, k in zip(g.edge_names, kept) if k], "pruned": pruned,
        "masks_evaluated": evaluate.rows,
    })


def acdc(
    model, clean, corrupt, metric: "Metric | Callable | None" = None, *, threshold: float, ablation: Ablation = "resample",
    reference: Any = None, change: Literal["increase", "abs"] | None = None, batch_size: int = 64,
    graph: EdgeGraph | None = None, prune: bool = True, reuse_prefix: bool = True, search: Search = "speculative",
) -> Result:
    """ACDC (Conmy et al. 2023): over receivers in reverse topological order, and their incoming edges
    from the latest sender back, remove (patch) an edge when that changes the metric by less than
    ``threshold``; removals stick. The metric defaults to ``kl_to_clean()`` with ``change="increase"``
    (a removal that lowers the KL is always taken); any other metric uses ``change="abs"``.

    Batched, with the result of the sequential greedy algorithm (``search``, see the module docstring):
    ``"speculative"`` evaluates up to ``batch_size // n_prompts`` consecutive candidates per forward, across
    receivers, each row with the decisions before it guessed (as the last decision about the same sender);
    a wrong guess ends the forward's useful rows at that candidate. ``"rounds"``: two forwards per round of one receiver.
    ``prune`` (default): after the greedy pass, kept edges off every input-to-output path of kept edges
    (a sender nothing kept feeds, a receiver whose node reaches no kept edge onward) are removed too
    (:func:`~crosspatch.methods.edge_paths.connected`), and the final metric is re-measured (one forward).
    ``reuse_prefix`` (default, where the adapter can resume): every patched run starts from the clean
    run's residual at the first block whose receivers it patches; the numbers are the same.
    The Result holds 1 for every edge kept in the circuit, 0 for removed ones.
    """
    return acdc_sweep(model, clean, corrupt, metric, thresholds=[threshold], ablation=ablation, reference=reference,
                      change=change, batch_size=batch_size, graph=graph, prune=prune, reuse_prefix=reuse_prefix,
                      search=search)[0]


def acdc_sweep(
    model, clean, corrupt, metric: "Metric | Callable | None" = None, *, thresholds: Sequence[float],
    ablation: Ablation = "resample", reference: Any = None, change: Literal["increase", "abs"] | None = None,
    batch_size: int = 64, graph: EdgeGraph | None = None, prune: bool = True, reuse_prefix: bool = True,
    search: Search = "speculative",
) -> list[Result]:
    """:func:`acdc` at every threshold (one Result each, in the order given), on one clean run, one ablated
    run and one table of evaluated masks: thresholds run from the smallest up, each speculative search
    guessing every decision as the previous threshold's, and a mask any of them evaluated is not run again.
    Each Result is the one :func:`acdc` gives alone (``metadata["forwards"]`` counts the sweep's so far)."""
    change = change or ("increase" if metric is None else "abs")
    if search not in ("speculative", "rounds"):
        raise ValueError(f"search must be 'speculative' or 'rounds', got {search!r}")
    p = EdgePatcher(model, clean, corrupt, ablation, reference, graph)
    metric = model_metric(p.m, metric if metric is not None else kl_to_clean())  # text answers: the tokenizer
    evaluate = _Evaluator(p, metric, batch_size, reuse_prefix)
    order = _order(p.graph)
    results: dict[int, Result] = {}
    guess = None
    for i in sorted(range(len(thresholds)), key=lambda i: thresholds[i]):
        if search == "speculative":
            removed, current = _speculative(evaluate, p.graph, order, thresholds[i], change, guess)
            guess = removed.numpy() != 0
        else:
            removed, current = _rounds(evaluate, p.graph, thresholds[i], change)
        results[i] = _circuit(p, evaluate, metric, removed, current, prune,
                              {"threshold": thresholds[i], "change": change, "search": search})
    return [results[i] for i in range(len(thresholds))]
