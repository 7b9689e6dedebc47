"""CD-T's circuit search (crosspatch.methods.cdt_circuit) against the tracr ground truth and the exact-patching
ranking, with its runtime next to ACDC and EAP on the same edge graph and inputs.

Cases: the four tracr programs (16 reference inputs of one length: reverse 3, the others 5; zero ablation, as
docs/tracr.md) and the zoo's ioi-gpt2-tiny and greater-than-tiny (32 held-out pairs each, of one length; mean ablation
over the corrupt prompts, CD-T's baseline the same mean per position; metric ``logit_diff`` of the answer against the
distractor). For each case:

* the exact ranking: every edge patched alone (``patch_edges``, the case's ablation), the change of the metric
  (tracr: ``output_distance``, the KL to the clean output; zoo models: ``logit_diff``) averaged over prompts;
* CD-T's circuit with ``paths="direct"`` (each edge's own score; the default) and ``paths="all"`` (the paper's: the
  relevance a source reaches a target with along every path), threshold 0.05, and direct without pruning
  (threshold 0: every receiver a nonzero score reaches is searched);
* EAP (tracr: ``output_score``; zoo models: ``logit_diff``) and ACDC (tracr: ``output_distance``, threshold 1e-12,
  ``change="increase"``; zoo models: ``logit_diff``, threshold 1 % of the clean value) on the same graph.

Reported: ROC AUC against tracr's compiled circuit, against the *functional* edges (exact effect > 1e-6, tracr)
or the exact ranking's top 10 % (zoo models), the Spearman correlation with the exact effects over all edges, and the
median wall-clock time of 3 runs after a warm-up (one torch thread; the exact sweep once). ACDC gives 1 / 0 per
edge, so its AUC is one interior point of the ROC.

The node table (``granularity="node"``: (layer, position, head), (layer, position) MLP and per-position embedding
nodes) needs a ground truth with positions, which tracr's compiled circuit does not give. It is derived by exact
patching of each node: the node alone ablated (tracr: zeroed; zoo models: set to its per-position mean over the corrupt
prompts, CD-T's baseline), ``|metric change|`` averaged over prompts; positives are the *functional* nodes (effect >
1e-6, tracr) or the top 10 % (zoo models). A node's CD-T score is ``node_scores``' (the path rule: the best product of
``|edge scores|`` along a searched path to the output; the "edge rule" row: its largest ``|edge score|``); the
position-free methods give each position of a component the component's score (CD-T's component search: the path
rule; EAP: the component's largest ``|edge score|``), which is what a position-free ranking can say about a node.
AtP per node is the gradient estimate of the same ablation at every node at once (EAP's metric; one forward and
backward), checked against a finite difference at its three largest nodes. "Recall": the share of the positives
the search keeps. The node search is also collapsed onto the component graph (``to_components``: the largest
node-edge score per component edge) and scored against tracr's compiled circuit, next to the component search.

    python benchmarks/cdt_circuit.py                 # the tables of benchmarks/cdt_circuit.md
    python benchmarks/cdt_circuit.py --cases hist --repeats 1
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

import crosspatch as cp
from crosspatch.adapters.tracr import load, output_distance, output_score
from crosspatch.methods.cdt_circuit import cdt_circuit
from crosspatch.methods.cdt_circuit_nodes import at_position, node_scores, to_components
from crosspatch.methods.circuit_eval import roc
from crosspatch.methods.edges import acdc, eap, edge_graph, patch_edges
from crosspatch.methods.pairs import model_metric
from crosspatch.results.metrics import MetricContext
from crosspatch.sites.site import Site

TRACR = Path(__file__).resolve().parents[1] / "tests" / "data" / "tracr"
LENGTH = {"reverse": 3, "frac_prevs": 5, "sort_unique": 5, "hist": 5}
ZOO = {"ioi-gpt2-tiny": "ioi", "greater-than-tiny": "greater-than"}  # zoo model -> its task
CASES = [*LENGTH, *ZOO]


@dataclass
class Case:
    name: str
    m: Any
    clean: Any
    corrupt: Any
    ablation: str
    exact_metric: Any  # the metric the exact ranking and ACDC read
    eap_metric: Any
    acdc_threshold: float
    acdc_change: str
    truth: set[str] | None


def tracr_case(name: str) -> Case:
    model = load(TRACR, name)
    refs = [r["ids"] for r in model.meta["reference"] if len(r["ids"]) == LENGTH[name] + 1]
    ids = torch.tensor(refs)[torch.randperm(len(refs), generator=torch.Generator().manual_seed(0))[:16]]
    m = cp.wrap(model)
    return Case(name, m, ids, None, "zero", output_distance(model.categorical), output_score(model.categorical),
                1e-12, "increase", set(model.circuit_edges))


def zoo_case(name: str = "ioi-gpt2-tiny") -> Case:
    from crosspatch.zoo.tasks import get_task

    m = cp.wrap(name)
    pairs = get_task(ZOO[name]).pairs(32, seed=0, split="test")
    metric = cp.metrics.logit_diff([p.answer_prefix + p.answer for p in pairs], [p.answer_prefix + p.distractor for p in pairs])
    metric = model_metric(m, metric)
    clean, corrupt = [p.clean for p in pairs], [p.corrupt for p in pairs]
    out = m.run(clean).output
    value = float(metric(out, MetricContext(torch.arange(len(pairs)), out, m.prepare(clean).get("attention_mask"))).mean())
    return Case(name, m, clean, corrupt, "mean", metric, metric, 0.01 * abs(value), "abs", None)


def exact_effects(case: Case, graph) -> np.ndarray:
    """|metric(one edge patched) - metric(clean)| per edge, prompt means."""
    metric = model_metric(case.m, case.exact_metric)
    prepared = case.m.prepare(case.clean)
    n, mask = next(iter(prepared.values())).shape[0], prepared.get("attention_mask")
    clean_out = case.m.run(case.clean).output
    reference = case.corrupt if case.ablation == "mean" else None
    masks = torch.cat([torch.zeros(1, len(graph)), torch.eye(len(graph))])
    values = []
    for chunk in torch.split(masks, 16):
        out = patch_edges(case.m, case.clean, case.corrupt, chunk, ablation=case.ablation, reference=reference, graph=graph)
        ctx = MetricContext(torch.arange(n).repeat(chunk.shape[0]), clean_out, None if mask is None else mask.repeat(chunk.shape[0], 1))
        with torch.inference_mode():
            values.append(metric(out, ctx).double().view(chunk.shape[0], n).mean(dim=1))
    values = torch.cat(values)
    return (values[1:] - values[0]).abs().numpy()


def node_effects(case: Case, nodes: list[str]) -> np.ndarray:
    """|metric(node ablated) - metric(clean)| per node, prompt means: zeroed (tracr) or set to its per-position mean
    over the corrupt prompts (zoo models), one forward a node."""
    metric = model_metric(case.m, case.exact_metric)
    prepared = case.m.prepare(case.clean)
    n = next(iter(prepared.values())).shape[0]
    clean_out = case.m.run(case.clean).output
    ctx = MetricContext(torch.arange(n), clean_out, prepared.get("attention_mask"))
    with torch.inference_mode():
        base = float(metric(clean_out, ctx).double().mean())
        values = []
        for node in nodes:
            iv = cp.Zero() if case.ablation == "zero" else cp.Mean(reference=case.corrupt)
            out = case.m.run(case.clean, {node: iv}).output
            values.append(float(metric(out, ctx).double().mean()))
    return np.abs(np.array(values) - base)


def node_atp(case: Case, g, n_pos: int) -> dict[str, float]:
    """Attribution patching at node level, with the exact sweep's ablation: ``(baseline - clean) . d metric / d node``
    summed over the node's dims, prompt means (EAP's metric; one forward with grad and one backward, plus a capture of
    the corrupt prompts for the mean). The gradient is read through a zero probe added at each sender family."""
    m, keys = case.m, [key for key, _ in g.sender_keys]
    metric = model_metric(m, case.eap_metric)
    probes: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def probe(key: str):
        def add(x):
            p = torch.zeros_like(x, requires_grad=True)
            probes[key] = (p, x.detach())
            return x + p
        return add

    run = m.run(case.clean, {key: probe(key) for key in keys}, grad=True)
    n = next(iter(m.prepare(case.clean).values())).shape[0]
    value = metric(run.output, MetricContext(torch.arange(n), run.output.detach(), None)).sum()
    grads = torch.autograd.grad(value, [probes[key][0] for key in keys])
    ref = m.capture(case.corrupt, keys) if case.ablation == "mean" else None
    scores = {}
    for key, grad in zip(keys, grads):
        act = probes[key][1]
        base = torch.zeros_like(act) if ref is None else ref[key].mean(0, keepdim=True).expand_as(act)
        per = ((base - act) * grad).sum(-1).mean(0)  # [pos] or [pos, head]
        senders = [name for name in g.senders if Site.parse(name).key == key]
        for p in range(n_pos):
            for h, sender in enumerate(senders):
                scores[at_position(sender, p)] = float(per[p, h] if per.ndim == 2 else per[p])
    return scores


def check_atp(case: Case, scores: dict[str, float], top: int = 3, eps: float = 1e-3) -> None:
    """AtP per node against a finite difference: the node moved a step ``eps`` towards its ablation value, for the
    ``top`` nodes by |AtP| (a wrong gradient path would stop the benchmark here)."""
    m, metric = case.m, model_metric(case.m, case.eap_metric)
    n = next(iter(m.prepare(case.clean).values())).shape[0]
    with torch.inference_mode():
        out = m.run(case.clean).output
        ctx = MetricContext(torch.arange(n), out, None)
        base = float(metric(out, ctx).double().mean())
        for node in sorted(scores, key=lambda k: -abs(scores[k]))[:top]:
            key = Site.parse(node).key
            mean = None if case.ablation == "zero" else m.capture(case.corrupt, [key])[key].mean(0, keepdim=True)

            def step(x, ctx, mean=mean):
                target = torch.zeros_like(x) if mean is None else ctx.select(mean.expand_as(ctx.target))
                return x + eps * (target - x)

            moved = float(metric(m.run(case.clean, {node: step}).output, ctx).double().mean())
            slope = (moved - base) / eps
            if abs(slope - scores[node]) > 0.05 * abs(scores[node]) + 1e-4:
                raise AssertionError(f"AtP at {node} is {scores[node]:.6g}, the finite difference {slope:.6g}")


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = (np.argsort(np.argsort(x, kind="stable"), kind="stable").astype(float) for x in (a, b))
    # average ranks for ties
    for x, r in ((a, ra), (b, rb)):
        for value in np.unique(x):
            where = x == value
            r[where] = r[where].mean()
    return float(np.corrcoef(ra, rb)[0, 1])


def timed(fn: Callable[[], Any], repeats: int) -> tuple[Any, float]:
    result = fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return result, statistics.median(times)


def run_case(case: Case, repeats: int) -> tuple[list[dict], list[dict]]:
    g = edge_graph(case.m)
    names = g.edge_names
    start = time.perf_counter()
    exact = exact_effects(case, g)
    exact_time = time.perf_counter() - start
    if case.truth is not None:
        positives = {names[i] for i in np.flatnonzero(exact > 1e-6)}
        label = "functional"
    else:
        k = max(1, round(0.1 * len(names)))
        positives = {names[i] for i in np.argsort(-exact, kind="stable")[:k]}
        label = f"exact top {k}"
    ref = case.corrupt if case.ablation == "mean" else None
    irrel = "zero" if case.ablation == "zero" else "mean"
    metric = case.exact_metric if case.truth is None else None  # zoo models: logit_diff's share at the logits; tracr: norm shares
    methods: dict[str, Callable[[], Any]] = {
        "CD-T direct": lambda: cdt_circuit(case.m, case.clean, metric, threshold=0.05, irrel=irrel, reference=ref,
                                           graph=g, progress=False),
        "CD-T direct, unpruned": lambda: cdt_circuit(case.m, case.clean, metric, threshold=0.0, irrel=irrel, reference=ref,
                                                     graph=g, progress=False),
        "CD-T all paths (paper)": lambda: cdt_circuit(case.m, case.clean, metric, threshold=0.05, irrel=irrel, reference=ref,
                                                      paths="all", graph=g, progress=False),
        "EAP": lambda: eap(case.m, case.clean, case.corrupt, case.eap_metric, ablation=case.ablation, reference=ref, graph=g),
        "ACDC": lambda: acdc(case.m, case.clean, case.corrupt, case.exact_metric, threshold=case.acdc_threshold,
                             ablation=case.ablation, reference=ref, change=case.acdc_change, graph=g),
    }
    rows = []
    results = {}
    for method, fn in methods.items():
        res, seconds = timed(fn, repeats)
        results[method] = (res, seconds)
        scores = np.abs(np.asarray(res.values, dtype=float))
        table = dict(zip(names, scores))
        row = {"case": case.name, "method": method, "edges": len(names), "seconds": seconds,
               "auc_truth": roc(table, case.truth).metadata["auc"] if case.truth else None,
               "auc_exact": roc(table, positives).metadata["auc"], "label": label,
               "spearman": spearman(scores, exact), "scored": len(res.metadata.get("scored", names)),
               "kept": len(res.metadata["kept"]) if "kept" in res.metadata else None}
        rows.append(row)
    rows.append({"case": case.name, "method": "exact patching (every edge alone)", "edges": len(names), "seconds": exact_time,
                 "auc_truth": roc(dict(zip(names, exact)), case.truth).metadata["auc"] if case.truth else None,
                 "auc_exact": 1.0, "label": label, "spearman": 1.0, "scored": len(names), "kept": len(positives)})
    return rows, node_rows(case, g, results, metric, irrel, ref, repeats)


def node_rows(case: Case, g, component: dict, metric: Any, irrel: str, ref: Any, repeats: int) -> list[dict]:
    """The node-level table: CD-T's node search against exact patching of every node (see the docstring)."""
    n_pos = int(case.m.adapter.sizes(case.m.prepare(case.clean))["pos"])
    nodes = [at_position(s, p) for s in g.senders for p in range(n_pos)]
    start = time.perf_counter()
    exact = node_effects(case, nodes)
    exact_time = time.perf_counter() - start
    if case.truth is not None:
        positives, label = {nodes[i] for i in np.flatnonzero(exact > 1e-6)}, "functional"
    else:
        k = max(1, round(0.1 * len(nodes)))
        positives, label = {nodes[i] for i in np.argsort(-exact, kind="stable")[:k]}, f"exact top {k}"
    search = {  # (search arguments, node_scores rule)
        "CD-T node, direct": (dict(threshold=0.05), "path"),
        "CD-T node, direct, edge rule": (dict(threshold=0.05), "edge"),
        "CD-T node, direct, threshold 0.1": (dict(threshold=0.1), "path"),
        "CD-T node, direct, unpruned": (dict(threshold=0.0), "path"),
        "CD-T node, all paths (paper)": (dict(threshold=0.05, paths="all"), "path"),
    }
    rows = []
    for method, (kwargs, rule) in search.items():
        res, seconds = timed(lambda: cdt_circuit(case.m, case.clean, metric, irrel=irrel, reference=ref, graph=g,
                                                 granularity="node", progress=False, **kwargs), repeats)
        ranks = node_scores(res, rule)
        table = dict(zip(res_nodes := ranks.coords["node"], ranks.values))
        kept = {name.split("->")[0] for name in res.metadata["kept"]}
        collapsed = to_components(res, g)
        rows.append({"case": case.name, "method": method, "nodes": len(nodes), "seconds": seconds,
                     "auc_exact": roc(table, positives, level="node").metadata["auc"], "label": label,
                     "spearman": spearman(np.array([table[x] for x in nodes]), exact),
                     "recall": len(positives & kept) / len(positives), "kept": len(kept),
                     "scored": len(res.metadata["scored"]),
                     "auc_truth": roc(collapsed, case.truth).metadata["auc"] if case.truth else None})
        assert set(res_nodes) == set(nodes)
    table, seconds = timed(lambda: node_atp(case, g, n_pos), repeats)
    check_atp(case, table)
    rows.append({"case": case.name, "method": "AtP per node (gradient, same ablation)", "nodes": len(nodes),
                 "seconds": seconds, "auc_exact": roc(table, positives, level="node").metadata["auc"], "label": label,
                 "spearman": spearman(np.abs(np.array([table[x] for x in nodes])), exact), "recall": None,
                 "kept": None, "scored": None, "auc_truth": None})
    for method in ("CD-T direct", "EAP"):
        res, seconds = component[method]
        if method == "EAP":  # a score per edge: a sender's largest |edge score|
            per = {s: 0.0 for s in g.senders}
            for edge, value in zip(res.coords["edge"], np.asarray(res.values, dtype=float)):
                per[edge.split("->")[0]] = max(per[edge.split("->")[0]], abs(float(value)))
        else:
            per = dict(zip(node_scores(res).coords["node"], node_scores(res).values))
        table = {at_position(s, p): per[s] for s in g.senders for p in range(n_pos)}
        rows.append({"case": case.name, "method": f"{method} (components, each position alike)", "nodes": len(nodes),
                     "seconds": seconds, "auc_exact": roc(table, positives, level="node").metadata["auc"], "label": label,
                     "spearman": spearman(np.array([table[x] for x in nodes]), exact), "recall": None, "kept": None,
                     "scored": None, "auc_truth": None})
    rows.append({"case": case.name, "method": "exact patching (every node alone)", "nodes": len(nodes),
                 "seconds": exact_time, "auc_exact": 1.0, "label": label, "spearman": 1.0, "recall": 1.0,
                 "kept": len(positives), "scored": None, "auc_truth": None})
    return rows


def render(rows: list[dict]) -> str:
    lines = ["| case | method | AUC vs tracr circuit | AUC vs exact (positives) | Spearman vs exact | edges scored | kept | time (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        truth = "—" if r["auc_truth"] is None else f"{r['auc_truth']:.3f}"
        kept = "—" if r["kept"] is None else str(r["kept"])
        lines.append(f"| {r['case']} | {r['method']} | {truth} | {r['auc_exact']:.3f} ({r['label']}) | {r['spearman']:.3f} | "
                     f"{r['scored']}/{r['edges']} | {kept} | {r['seconds']:.3f} |")
    return "\n".join(lines)


def render_nodes(rows: list[dict]) -> str:
    lines = ["| case | method | AUC vs exact nodes (positives) | Spearman vs exact | recall (kept) | node edges scored | "
             "collapsed: AUC vs tracr circuit | time (s) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        recall = "—" if r["recall"] is None else f"{r['recall']:.2f} ({r['kept']})"
        scored = "—" if r["scored"] is None else str(r["scored"])
        truth = "—" if r["auc_truth"] is None else f"{r['auc_truth']:.3f}"
        lines.append(f"| {r['case']} | {r['method']} | {r['auc_exact']:.3f} ({r['label']}, {r['nodes']} nodes) | "
                     f"{r['spearman']:.3f} | {recall} | {scored} | {truth} | {r['seconds']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=CASES, choices=CASES)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows, nodes = [], []
    for name in args.cases:
        case = zoo_case(name) if name in ZOO else tracr_case(name)
        edge_rows, node_table = run_case(case, args.repeats)
        rows, nodes = rows + edge_rows, nodes + node_table
    print(f"{platform.machine()}, torch {torch.__version__}, 1 thread, median of {args.repeats} runs after a warm-up\n")
    print(render(rows))
    print()
    print(render_nodes(nodes))


if __name__ == "__main__":
    main()
