"""ACDC (Conmy et al. 2023): the greedy search over receivers in reverse topological order that removes
(patches) an edge when that changes the metric by less than a threshold, batched so that each round is
one or two forwards of exact edge patching (optionally resumed from the clean prefix) with the result
of the sequential algorithm, then pruned to the edges on some input-to-output path of kept edges.
"""

from __future__ import annotations

from typing import Any, Callable, Literal

import torch

from ...results.metrics import Metric, MetricContext, kl_to_clean
from ...results.result import Result
from ..edge_paths import connected
from ..pairs import model_metric
from .graph import EdgeGraph
from .patching import Ablation, _Patcher
from .result import _result


def acdc(
    model, clean, corrupt, metric: "Metric | Callable | None" = None, *, threshold: float, ablation: Ablation = "resample",
    reference: Any = None, change: Literal["increase", "abs"] | None = None, batch_size: int = 64,
    graph: EdgeGraph | None = None, prune: bool = True, reuse_prefix: bool = True,
) -> Result:
    """ACDC (Conmy et al. 2023): over receivers in reverse topological order, and their incoming edges
    from the latest sender back, remove (patch) an edge when that changes the metric by less than
    ``threshold``; removals stick. The metric defaults to ``kl_to_clean()`` with ``change="increase"``
    (a removal that lowers the KL is always taken); any other metric uses ``change="abs"``.

    Batched, with the result of the sequential greedy algorithm: a round evaluates every remaining
    candidate of the receiver alone (row blocks of one forward, up to ``batch_size`` rows each); from
    the first acceptable one ``i`` a second forward evaluates the running removals ``todo[i]``,
    ``todo[i:i+2]``, ...; they are accepted while each step stays under the threshold, the first
    failure is rejected, and the next round starts after it. A receiver whose edges all go costs two
    forwards; one whose edges all stay costs one.
    ``prune`` (default): after the greedy pass, kept edges off every input-to-output path of kept edges
    (a sender nothing kept feeds, a receiver whose node reaches no kept edge onward) are removed too
    (:func:`~crosspatch.methods.edge_paths.connected`), and the final metric is re-measured (one forward).
    ``reuse_prefix`` (default, where the adapter can resume): every patched run starts from the clean
    run's residual at the first block whose receivers it patches (in reverse topological order that is
    the current receiver's block); the numbers are the same.
    The Result holds 1 for every edge kept in the circuit, 0 for removed ones.
    """
    change = change or ("increase" if metric is None else "abs")
    p = _Patcher(model, clean, corrupt, ablation, reference, graph)
    metric = model_metric(p.m, metric if metric is not None else kl_to_clean())  # text answers: the tokenizer
    n, g = p.n, p.graph
    sizes = p.m.adapter.sizes(p.clean)
    at = metric.positions(MetricContext(torch.arange(n)), sizes)
    if reuse_prefix:
        kept = p.keep_clean(at)  # also sets p.clean_out
    else:
        kept, p.clean_out = None, p._execute(p.clean, output_at=at).output
    clean_out = p.clean_out

    def evaluate(masks: torch.Tensor) -> torch.Tensor:
        out = []
        per = max(1, batch_size // n)
        for start in range(0, masks.shape[0], per):
            chunk = masks[start : start + per]
            ctx = MetricContext(torch.arange(n).repeat(chunk.shape[0]), clean_out, None)
            output = p.run(chunk, metric.positions(ctx, sizes), kept)
            ctx.example = ctx.example.to(output.device)
            with torch.inference_mode():
                out.append(metric(output, ctx).double().view(chunk.shape[0], n).mean(dim=1).cpu())
        return torch.cat(out)

    def score(values: torch.Tensor, current: float) -> torch.Tensor:
        return values - current if change == "increase" else (values - current).abs()

    removed = torch.zeros(len(g))
    current = float(evaluate(removed[None])[0])
    incoming: dict[int, list[int]] = {}
    for e, (s, r) in enumerate(g.edges):
        incoming.setdefault(r, []).append(e)
    for r in sorted(incoming, key=lambda r: (EdgeGraph._stage(g.receivers[r]), r), reverse=True):
        todo = sorted(incoming[r], key=lambda e: g.edges[e][0], reverse=True)
        while todo:
            # Round: every remaining candidate alone against the current circuit (one batched forward) ...
            masks = removed.repeat(len(todo), 1)
            masks[torch.arange(len(todo)), torch.tensor(todo)] = 1
            ok = torch.nonzero(score(evaluate(masks), current) < threshold).flatten()
            if len(ok) == 0:
                break
            # ... then, from the first acceptable one, the running removals todo[i], todo[i:i+2], ... (one more
            # forward): accepted while each step passes, exactly as one at a time; the first failure is rejected.
            i = int(ok[0])
            run = todo[i:]
            masks = removed.repeat(len(run), 1)
            for j, e in enumerate(run):
                masks[j:, e] = 1
            values = evaluate(masks)
            j = 0
            while j < len(run) and score(values[j : j + 1], current)[0] < threshold:
                removed[run[j]] = 1
                current = float(values[j])
                j += 1
            todo = run[j + 1 :]
    kept = 1 - removed.numpy()
    pruned: list[str] = []
    if prune:
        linked = connected(g, kept)
        pruned = [name for name, before, after in zip(g.edge_names, kept, linked) if before and not after]
        if pruned:
            kept = linked
            current = float(evaluate(torch.as_tensor(1 - kept, dtype=removed.dtype)[None])[0])
    return _result(p, kept, "acdc", metric, {
        "threshold": threshold, "change": change, "final_metric": current,
        "kept": [name for name, k in zip(g.edge_names, kept) if k], "pruned": pruned,
    })
