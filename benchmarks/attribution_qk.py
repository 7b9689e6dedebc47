"""QK attribution as the prompt grows: the default ``method="rows"`` (``2 d_head`` graph rows by backward passes,
plus ``d + 1`` rows of one block's query/key computation) against ``method="forward"`` (one frozen forward row per
node), on the random GPT-2-small-geometry model and transcoder of ``attribution_graph.py``.

The edge: layer 2, head 0, from the last position to the middle one. Each (length, method) runs in its own
process (its peak resident memory is its own); the parent compares the two methods' node terms where both ran.

    python benchmarks/attribution_qk.py                          # 64, 128, 256 tokens; forward at 64
    python benchmarks/attribution_qk.py --lengths 64 --forward 64 --out /tmp/qk.md
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
LAYER, HEAD = 2, 0


def _one(length: int, method: str, batch: int) -> dict:
    sys.path.insert(0, str(HERE))
    from attribution_graph import _setup  # the graph benchmark's model and transcoder

    from crosspatch.methods.attribution_graph.qk import qk_attribution

    m, tc, ids = _setup(length)
    start_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    res = qk_attribution(m, tc, ids, LAYER, HEAD, -1, length // 2, method=method, batch_size=batch)
    seconds = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"length": length, "method": method, "batch": batch, "seconds": round(seconds, 2),
            "peak_mb": round(peak_mb, 1), "above_start_mb": round(peak_mb - start_mb, 1),
            "n_sources": res.metadata["n_sources"], "nodes": res.n_nodes, "score": res.score,
            "gap": res.metadata["gap"], "closure": res.metadata["closure"], "probability": res.probability,
            "graph_index": res.graph_index, "query_terms": res.query_terms.tolist(), "key_terms": res.key_terms.tolist()}


def _agreement(a: dict, b: dict) -> float:
    """The largest difference of a node's query- or key-side term between two runs (nodes matched by index)."""
    qa = dict(zip(a["graph_index"], zip(a["query_terms"], a["key_terms"])))
    qb = dict(zip(b["graph_index"], zip(b["query_terms"], b["key_terms"])))
    worst = 0.0
    for n in set(qa) | set(qb):
        x, y = qa.get(n, (0.0, 0.0)), qb.get(n, (0.0, 0.0))
        worst = max(worst, abs(x[0] - y[0]), abs(x[1] - y[1]))
    return worst


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--forward", type=int, nargs="*", default=[64], help="lengths also run with method=forward")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--one", nargs=2, metavar=("LENGTH", "METHOD"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        torch.set_num_threads(2)
        print(json.dumps(_one(int(args.one[0]), args.one[1], args.batch)))
        return
    rows = []
    for length in args.lengths:
        for method in ("rows", "forward") if length in args.forward else ("rows",):
            out = subprocess.run([sys.executable, __file__, "--one", str(length), method, "--batch", str(args.batch)],
                                 capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"{length} {method}: {r['seconds']} s, peak {r['peak_mb']} MB, {r['nodes']} nodes", file=sys.stderr,
                  flush=True)
    by = {(r["length"], r["method"]): r for r in rows}
    lines = [
        f"Measured by `python benchmarks/attribution_qk.py` on {platform.platform()} (torch {torch.__version__}, "
        f"2 threads, CPU), one process per row; layer {LAYER}, head {HEAD}, last position to the middle one; "
        f"batch {args.batch}.",
        "",
        "| tokens | method | graph sources | nodes with a part | s | peak MB | above start MB | score | sum of terms - score | max term difference vs rows |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        other = by.get((r["length"], "rows"))
        diff = "" if r["method"] == "rows" or other is None else f"{_agreement(r, other):.2e}"
        lines.append(f"| {r['length']} | {r['method']} | {r['n_sources']} | {r['nodes']} | {r['seconds']} | "
                     f"{r['peak_mb']} | {r['above_start_mb']} | {r['score']:.4f} | {r['gap']:.1e} | {diff} |")
    text = "\n".join(lines) + "\n"
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
