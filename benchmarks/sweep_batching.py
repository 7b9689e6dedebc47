"""Batched sweeps with and without prefix reuse against one forward per site, and hook overhead.

Every number is a ratio against a baseline measured in the same run (median of repeats), so
the results travel between machines. Run: ``python benchmarks/sweep_batching.py``.
"""

from __future__ import annotations

import argparse

import torch
from common import gpt2_setup, median_time, size_arguments

import crosspatch as cp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size_arguments(parser, seq=16, prompts=8)
    args = parser.parse_args()
    setup = gpt2_setup(args.layers, args.d_model, args.seq, args.prompts)
    model, m, clean, corrupt, metric = setup.model, setup.m, setup.clean, setup.corrupt, setup.metric

    with torch.inference_mode():
        bare = median_time(lambda: model(clean, use_cache=False), args.repeats)
    capture = median_time(lambda: m.run(clean, capture="resid_pre.*"), args.repeats)

    def sweep(sites: str, batch_size: int, reuse: bool) -> float:
        return median_time(
            lambda: cp.activation_patching(
                m, clean, corrupt, sites, metric, batch_size=batch_size, reuse_prefix=reuse, progress=False
            ),
            args.repeats,
        )

    rows = []
    for sites in ("resid_pre.*[pos=*]", "head_out.*[head=*]"):
        n_sites = len(m.catalog.expand(sites, {"pos": args.seq}))
        one = sweep(sites, args.prompts, reuse=False)  # one site per forward, everything recomputed
        batched = sweep(sites, 256, reuse=False)
        reused = sweep(sites, 64, reuse=True)  # the defaults
        rows.append((sites, n_sites, one, batched, reused))

    print(f"GPT-2 {args.layers} layers, d_model {args.d_model}, {args.prompts} prompts x {args.seq} tokens, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    print(f"bare forward {bare * 1e3:.1f} ms; forward capturing every resid_pre {capture * 1e3:.1f} ms "
          f"({capture / bare:.3f}x)")
    for sites, n_sites, one, batched, reused in rows:
        per_site = [t / (n_sites * bare) for t in (one, batched, reused)]
        print(f"{sites:22s} {n_sites:4d} sites, bare forwards per site: one site per forward {per_site[0]:.2f}, "
              f"batched {per_site[1]:.2f}, batched with prefix reuse {per_site[2]:.2f} "
              f"({one / reused:.2f}x faster than one per forward)")

if __name__ == "__main__":
    main()
