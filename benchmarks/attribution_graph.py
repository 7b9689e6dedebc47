"""Attribution graphs as the prompt grows: time and peak memory of the sparse adjacency and pruning against the
dense ``[nodes, nodes]`` formulation the reference keeps, on a random model of GPT-2 small's geometry.

The model is a GPT-2 with 12 layers, 12 heads and d_model 768 (random weights, a 4,096-token vocabulary so the
logits of long prompts stay small); the transcoder is a random per-layer JumpReLU transcoder (1,024 features per
layer) whose thresholds, calibrated on a 64-token prompt, leave about 4 features active per layer and position.
Each length runs in its own process (so its peak resident memory is its own): build the graph with
``max_feature_nodes`` feature rows and ``max_n_logits`` targets (the rows cost the same in both formulations),
then prune. ``sparse`` keeps the adjacency as crosspatch does (COO of its nonzeros) and prunes it sparsely;
``dense`` densifies the same rows into a float32 ``[nodes, nodes]`` matrix and prunes it with dense matrix
products, as the reference does. A dense matrix over the memory budget is not allocated: its size is reported.

    python benchmarks/attribution_graph.py                      # 64 .. 2048 tokens: attribution_graph.md
    python benchmarks/attribution_graph.py --lengths 64 128 --out /tmp/ag.md
    python benchmarks/attribution_graph.py --from-log run.log   # the table from the rows a run printed
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
LENGTHS = (64, 128, 256, 512, 1024, 2048)
GEOMETRY = {"n_layer": 12, "n_head": 12, "n_embd": 768, "vocab_size": 4096, "n_positions": 2048}
N_FEATURES, ACTIVE = 1024, 4


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _setup(length: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    import crosspatch as cp
    from crosspatch.trainable.transcoder import Transcoder

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**GEOMETRY)).eval()
    m = cp.wrap(model)
    L, d = GEOMETRY["n_layer"], GEOMETRY["n_embd"]
    tc = Transcoder(d, d, N_FEATURES, [f"mlp_in.{i}" for i in range(L)], [f"mlp_out.{i}" for i in range(L)])
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        tc.W_enc.copy_(torch.randn(tc.W_enc.shape, generator=gen) / d ** 0.5)
        for w in tc.W_dec:
            w.copy_(torch.randn(w.shape, generator=gen) * 0.02)
        calib = torch.randint(0, GEOMETRY["vocab_size"], (1, 64), generator=gen)
        cache = m.capture(calib, [f"mlp_in.{i}" for i in range(L)])
        for i in range(L):
            pre = tc.pre_activation(i, cache[f"mlp_in.{i}"][0])
            tc.threshold[i].fill_(float(pre.flatten().quantile(1 - ACTIVE / N_FEATURES)))
    ids = torch.randint(0, GEOMETRY["vocab_size"], (1, length), generator=torch.Generator().manual_seed(2))
    return m, tc, ids


def _dense_prune(A: torch.Tensor, w: torch.Tensor, node_threshold: float, edge_threshold: float, fixed: int,
                 n_errors: int) -> int:
    """The reference's pruning on a dense float32 matrix (normalise, Neumann series, thresholds)."""
    from crosspatch.methods.attribution_graph.prune import find_threshold

    def normalize(M):
        M = M.abs()
        return M.div_(M.sum(1, keepdim=True).clamp_min(1e-10))

    def influence(N):
        cur = w @ N
        total = cur.clone()
        while bool(cur.any()):
            cur = cur @ N
            total += cur
        return total

    N = normalize(A.clone())
    node = influence(N)
    mask = node >= find_threshold(node, node_threshold)
    mask[-fixed:] = True
    A[~mask] = 0
    A[:, ~mask] = 0
    N = normalize(A)
    edge_scores = N.mul_((influence(N) + w)[:, None])
    keep = (edge_scores >= find_threshold(edge_scores[edge_scores > 0], edge_threshold)) & (edge_scores > 0)
    del edge_scores, N
    n_features = int(mask.numel()) - fixed - n_errors
    old = None
    while old is None or not torch.equal(old, mask):  # iterated removal of nodes without inputs or outputs
        old = mask.clone()
        keep[~mask] = False
        keep[:, ~mask] = False
        mask[:-fixed] &= keep[:, :-fixed].any(0)
        mask[:n_features] &= keep[:n_features].any(1)
    keep[~mask] = False
    keep[:, ~mask] = False
    return int(keep.sum())


def child(length: int, mode: str, rows: int, logits: int, batch: int, budget_gb: float, store: Path) -> dict:
    """``sparse``: build the graph (saved to ``store``) and prune it; ``dense``: load that graph's rows, densify
    and prune them (no model in the process, so its peak is the dense formulation's own)."""
    from crosspatch.methods.attribution_graph import attribution_graph, prune

    if mode == "sparse":
        m, tc, ids = _setup(length)
        base = _rss_mb()
        t0 = time.perf_counter()
        graph = attribution_graph(m, tc, ids, max_feature_nodes=rows, max_n_logits=logits, batch_size=batch,
                                  progress=False)
        t_rows = time.perf_counter() - t0
        torch.save(graph, store)
    else:
        base = _rss_mb()
        graph = torch.load(store, weights_only=False)
        t_rows = None
    n = graph.n_nodes
    out = {"length": length, "mode": mode, "batch": batch, "nodes": n, "features": graph.n_features, "nnz": graph.adjacency._nnz(),
           "rows_seconds": None if t_rows is None else round(t_rows, 2), "dense_gb": round(n * n * 4 / 1e9, 3)}
    t1 = time.perf_counter()
    if mode == "sparse":
        pruned = prune(graph)
        out["kept_edges"] = pruned.edges._nnz()
    elif n * n * 4 / 1e9 > budget_gb:
        out["skipped"] = f"a dense [{n}, {n}] float32 matrix is {n * n * 4 / 1e9:.1f} GB (budget {budget_gb} GB)"
        return out
    else:
        A = graph.adjacency.to_dense().float()
        w = graph.target_weights().float()
        out["kept_edges"] = _dense_prune(A, w, 0.8, 0.98, graph.n_pos + len(graph.targets), graph.n_errors)
    out["prune_seconds"] = round(time.perf_counter() - t1, 2)
    out["peak_mb"] = round(_rss_mb(), 1)
    out["peak_above_start_mb"] = round(_rss_mb() - base, 1)
    return out


def render(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [
        "# Attribution graphs as the prompt grows: sparse adjacency vs the dense formulation",
        "",
        f"Measured by `python benchmarks/attribution_graph.py` on {platform.platform()} "
        f"({platform.processor() or 'cpu'}, torch {torch.__version__}, {torch.get_num_threads()} threads), "
        f"CPU only, one process per row.",
        "",
        f"Model: random GPT-2 of GPT-2 small's geometry ({GEOMETRY}); transcoder: random per-layer JumpReLU, "
        f"{N_FEATURES} features per layer, ~{ACTIVE} active per layer and position. Rows computed: "
        f"{args.logits} logit target row(s) and {args.rows} feature rows (`max_feature_nodes`), the same in both "
        f"formulations: the sparse process computes them (and keeps them as COO), the dense process loads them and "
        f"only densifies and prunes, so its peak is the dense matrix's cost alone (the reference holds that matrix "
        f"while it also runs the backward passes). Peak is the process's maximum resident set; 'above start' "
        f"subtracts what it held before the graph (the model and transcoder, or the loaded rows).",
        "",
        "Where the memory goes: the sparse process's peak is the backward passes' activations (attention's grow "
        "with batch x tokens^2), not the adjacency, whose nonzeros are listed; the dense formulation adds its "
        "[nodes, nodes] matrix on top of that. Times come from a shared 2-core machine with other jobs running: "
        "read them as indicative; the memory columns are the robust measure.",
        "",
        "| tokens | mode | batch | nodes | active features | nonzeros | kept edges | rows s | prune s | peak MB | "
        "above start MB | dense matrix GB | note |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['length']} | {r['mode']} | {r.get('batch', args.batch)} | {r['nodes']} | {r['features']} | "
            f"{r['nnz']} | {r.get('kept_edges', '-')} | "
            f"{r['rows_seconds'] if r['rows_seconds'] is not None else '(same rows)'} | "
            f"{r.get('prune_seconds', '-')} | {r.get('peak_mb', '-')} | {r.get('peak_above_start_mb', '-')} | "
            f"{r['dense_gb']} | {r.get('skipped', '')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    parser.add_argument("--rows", type=int, default=4, help="feature rows (max_feature_nodes)")
    parser.add_argument("--logits", type=int, default=1)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--budget-gb", type=float, default=8.0, help="largest dense matrix to allocate")
    parser.add_argument("--out", type=Path, default=HERE / "attribution_graph.md")
    parser.add_argument("--store", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--from-log", type=Path, help="render --out from the rows a run printed (one dict a line)")
    parser.add_argument("--child", nargs=2, metavar=("LENGTH", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.from_log:
        import ast

        rows = [ast.literal_eval(ln) for ln in args.from_log.read_text().splitlines() if ln.startswith("{")]
        args.out.write_text(render(rows, args))
        return
    if args.child:
        result = child(int(args.child[0]), args.child[1], args.rows, args.logits, args.batch, args.budget_gb,
                       args.store)
        print("RESULT " + json.dumps(result))
        return
    rows = []
    store = Path(tempfile.mkdtemp()) / "graph.pt"
    for length in args.lengths:
        for mode in ("sparse", "dense"):
            cmd = [sys.executable, __file__, "--child", str(length), mode, "--rows", str(args.rows), "--logits",
                   str(args.logits), "--batch", str(args.batch), "--budget-gb", str(args.budget_gb),
                   "--store", str(store)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                raise RuntimeError(f"{length} {mode} failed:\n{proc.stderr[-2000:]}")
            rows.append(json.loads(line[len("RESULT "):]))
            print(rows[-1], flush=True)
    (args.out.with_suffix(".json")).write_text(json.dumps(rows, indent=1))
    args.out.write_text(render(rows, args))


if __name__ == "__main__":
    main()
