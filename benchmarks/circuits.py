"""EAP's cost in forward-equivalents over every edge of a 4-layer GPT-2 (ratio against the bare forward
measured in the same run, by wall clock and by process CPU time, which other jobs on a shared machine
do not inflate) — the circuit-methods target is at most 3. The prompt pair differs in the middle token,
so the corrupt run computes the second half of the positions only; a pair that also differs at the
first position (nothing shared) is timed too. The ROC AUC targets against tracr's
ground truth are measured in tests/adapters/tracr/test_tracr.py and reported in docs/tracr.md.

    python benchmarks/circuits.py
"""

from __future__ import annotations

import argparse
import time

import torch
from common import gpt2_setup, paired, size_arguments

from crosspatch.methods.edges import eap, edge_graph


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size_arguments(parser, seq=32, prompts=16, repeats=11)
    args = parser.parse_args()
    torch.set_num_threads(1)
    setup = gpt2_setup(args.layers, args.d_model, args.seq, args.prompts)
    model, m, clean, corrupt, metric = setup.model, setup.m, setup.clean, setup.corrupt, setup.metric
    graph = edge_graph(m)

    def bare_forward():
        with torch.inference_mode():
            model(clean, use_cache=False)

    unshared = corrupt.clone()
    unshared[:, 0] = (unshared[:, 0] + 1) % 1000  # differs at the first position too: the corrupt run shares nothing

    def run_eap():
        eap(m, clean, corrupt, metric, graph=graph)

    def run_eap_unshared():
        eap(m, clean, unshared, metric, graph=graph)

    print(f"GPT-2 {args.layers} layers, d_model {args.d_model}, {args.prompts} prompts x {args.seq} tokens, "
          f"1 thread, median of {args.repeats} interleaved rounds: {len(graph.edges)} edges")
    fns = {"bare": bare_forward, "eap": run_eap, "unshared": run_eap_unshared}
    for name, clock in (("wall", time.perf_counter), ("cpu", time.process_time)):
        t = paired(fns, args.repeats, clock)
        print(f"{name:>4} clock: bare forward {t['bare'] * 1e3:.1f} ms; EAP over every edge {t['eap'] * 1e3:.1f} ms = "
              f"{t['eap'] / t['bare']:.2f} forward-equivalents (target <= 3); with a pair differing at position 0 too "
              f"(nothing shared) {t['unshared'] / t['bare']:.2f}")


if __name__ == "__main__":
    main()
