"""Batched sweeps with and without prefix reuse against one forward per site, and hook overhead.

Every number is a ratio against a baseline measured in the same run (median of repeats), so
the results travel between machines. Run: ``python benchmarks/sweep_batching.py``.
"""

from __future__ import annotations

import argparse
import time

import torch
from common import gpt2_setup, median_time, size_arguments

import crosspatch as cp


CLOCK = time.process_time  # with one torch thread: what the work costs, whatever else runs on the machine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size_arguments(parser, seq=16, prompts=8)
    args = parser.parse_args()
    torch.set_num_threads(1)
    setup = gpt2_setup(args.layers, args.d_model, args.seq, args.prompts)
    model, m, clean, corrupt, metric = setup.model, setup.m, setup.clean, setup.corrupt, setup.metric

    with torch.inference_mode():
        bare = median_time(lambda: model(clean, use_cache=False), args.repeats, CLOCK)
    capture = median_time(lambda: m.run(clean, capture="resid_pre.*"), args.repeats, CLOCK)

    def sweep(sites: str, batch_size: int, reuse: bool, skip: bool) -> float:
        return median_time(
            lambda: cp.activation_patching(
                m, clean, corrupt, sites, metric, batch_size=batch_size, reuse_prefix=reuse, skip_unchanged=skip,
                progress=False,
            ),
            args.repeats,
            CLOCK,
        )

    rows = []
    for sites in ("resid_pre.*[pos=*]", "head_out.*[head=*]"):
        n_sites = len(m.catalog.expand(sites, {"pos": args.seq}))
        times = (
            sweep(sites, args.prompts, reuse=False, skip=False),  # one site per forward, everything recomputed
            sweep(sites, 256, reuse=False, skip=False),
            sweep(sites, 64, reuse=True, skip=False),
            sweep(sites, 64, reuse=True, skip=True),  # the defaults
        )
        rows.append((sites, n_sites, times))

    print(f"GPT-2 {args.layers} layers, d_model {args.d_model}, {args.prompts} prompts x {args.seq} tokens, "
          f"{torch.get_num_threads()} thread, process CPU time, median of {args.repeats}")
    print(f"bare forward {bare * 1e3:.1f} ms; forward capturing every resid_pre {capture * 1e3:.1f} ms "
          f"({capture / bare:.3f}x)")
    for sites, n_sites, times in rows:
        one, batched, reused, defaults = (t / (n_sites * bare) for t in times)
        print(f"{sites:22s} {n_sites:4d} sites, bare forwards per site: one site per forward {one:.2f}, "
              f"batched {batched:.2f}, batched with prefix reuse {reused:.2f}, defaults (also skipping "
              f"unchanged sites) {defaults:.2f}")

if __name__ == "__main__":
    main()
