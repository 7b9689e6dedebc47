"""Batched sweeps against one forward per site, and hook overhead against the bare forward.

Every number is a ratio against a baseline measured in the same run (median of repeats), so
the results travel between machines. Run: ``python benchmarks/sweep_batching.py``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

import crosspatch as cp


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
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
    parser.add_argument("--seq", type=int, default=16)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    torch.manual_seed(0)
    config = GPT2Config(n_layer=args.layers, n_head=8, n_embd=args.d_model, vocab_size=1000, n_positions=128)
    model = GPT2LMHeadModel(config).eval()
    m = cp.wrap(model)
    clean = torch.randint(0, 1000, (args.prompts, args.seq))
    corrupt = clean.clone()
    corrupt[:, args.seq // 2] = (corrupt[:, args.seq // 2] + 1) % 1000
    metric = cp.metrics.logit_diff(clean[:, -1], (clean[:, -1] + 1) % 1000)
    torch.set_num_threads(torch.get_num_threads())

    with torch.inference_mode():
        bare = median_time(lambda: model(clean, use_cache=False), args.repeats)
    capture = median_time(lambda: m.run(clean, capture="resid_pre.*"), args.repeats)

    rows = []
    for sites in ("resid_pre.*[pos=*]", "head_out.*[head=*]"):
        n_sites = len(m.catalog.expand(sites, {"pos": args.seq}))
        one = median_time(
            lambda: cp.activation_patching(m, clean, corrupt, sites, metric, batch_size=args.prompts, progress=False),
            args.repeats,
        )
        batched = median_time(
            lambda: cp.activation_patching(m, clean, corrupt, sites, metric, batch_size=256, progress=False),
            args.repeats,
        )
        rows.append((sites, n_sites, one, batched))

    print(f"GPT-2 {args.layers} layers, d_model {args.d_model}, {args.prompts} prompts x {args.seq} tokens, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    print(f"bare forward {bare * 1e3:.1f} ms; forward capturing every resid_pre {capture * 1e3:.1f} ms "
          f"({capture / bare:.3f}x)")
    for sites, n_sites, one, batched in rows:
        print(f"{sites:22s} {n_sites:4d} sites: one site per forward {one:.3f} s, batched {batched:.3f} s "
              f"({one / batched:.2f}x faster); {one / (n_sites * bare):.2f} and "
              f"{batched / (n_sites * bare):.2f} bare forwards per site")


if __name__ == "__main__":
    main()
