"""EAP's cost in forward-equivalents over every edge of a 4-layer GPT-2 (ratio against the bare forward
measured in the same run) — the circuit-methods target is at most 3. The ROC AUC targets against tracr's
ground truth are measured in tests/adapters/tracr/test_tracr.py and reported in docs/tracr.md.

    python benchmarks/circuits.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

import crosspatch as cp
from crosspatch.methods.edges import eap, edge_graph


def median_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(1)
    config = GPT2Config(n_layer=args.layers, n_head=8, n_embd=args.d_model, vocab_size=1000, n_positions=128)
    model = GPT2LMHeadModel(config).eval()
    m = cp.wrap(model)
    clean = torch.randint(0, 1000, (args.prompts, args.seq))
    corrupt = clean.clone()
    corrupt[:, args.seq // 2] = (corrupt[:, args.seq // 2] + 1) % 1000
    metric = cp.metrics.logit_diff(clean[:, -1], (clean[:, -1] + 1) % 1000)
    graph = edge_graph(m)

    with torch.inference_mode():
        bare = median_time(lambda: model(clean, use_cache=False), args.repeats)
    cost = median_time(lambda: eap(m, clean, corrupt, metric, graph=graph), args.repeats)
    print(f"GPT-2 {args.layers} layers, d_model {args.d_model}, {args.prompts} prompts x {args.seq} tokens, "
          f"1 thread, median of {args.repeats}: {len(graph.edges)} edges")
    print(f"bare forward {bare * 1e3:.1f} ms; EAP over every edge {cost * 1e3:.1f} ms = "
          f"{cost / bare:.2f} forward-equivalents (target <= 3)")


if __name__ == "__main__":
    main()
