"""ACDC's threshold sweep on a GPT-2 of the widest tracr program's width (4 heads, MLP width 212): the
speculative search with one sweep (acdc_sweep) against the earlier batching (search="rounds", one acdc call
per threshold), with the edge receivers' earlier einsum (the previous code) and with their batched matmul,
measured in the same process by process CPU time (1 thread), with the forwards and masks each ran. All
give the sequential greedy circuit; the script checks that they agree at every threshold.

    python benchmarks/edges_acdc.py [--layers 4 --d-model 256 --seq 16 --prompts 16]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import crosspatch as cp
import crosspatch.methods.edges.patching as patching
from crosspatch.methods.edges import acdc, acdc_sweep, edge_graph


def setup(layers: int, d_model: int, seq: int, prompts: int):
    torch.manual_seed(0)
    config = GPT2Config(n_layer=layers, n_head=4, n_embd=d_model, n_inner=212, vocab_size=1000, n_positions=128)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # weights larger than the default init, so that edges differ in effect
        for p in model.parameters():
            if p.ndim > 1:
                p.normal_(0.0, 0.2)
    clean = torch.randint(0, 1000, (prompts, seq), generator=torch.Generator().manual_seed(1))
    corrupt = clean.clone()
    corrupt[:, seq // 2] = (corrupt[:, seq // 2] + 1) % 1000
    return cp.wrap(model), clean, corrupt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--seq", type=int, default=16)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--thresholds", type=float, nargs="+", default=[1e-3, 1e-2])
    args = parser.parse_args()
    torch.set_num_threads(1)
    m, clean, corrupt = setup(args.layers, args.d_model, args.seq, args.prompts)
    g = edge_graph(m)
    print(f"GPT-2 {args.layers} layers, 4 heads, d_model {args.d_model}, MLP 212, {args.prompts} prompts x {args.seq} "
          f"tokens, {len(g)} edges, KL to the clean output, thresholds {args.thresholds}, 1 thread, CPU time")

    matmul = patching._Receiver.apply
    patching._Receiver.apply = _einsum_apply  # the previous code: rounds and the receivers' einsum
    try:
        t0 = time.process_time()
        before = [acdc(m, clean, corrupt, threshold=t, graph=g, search="rounds") for t in args.thresholds]
        t_before = time.process_time() - t0
    finally:
        patching._Receiver.apply = matmul
    t0 = time.process_time()
    rounds = [acdc(m, clean, corrupt, threshold=t, graph=g, search="rounds") for t in args.thresholds]
    t_rounds = time.process_time() - t0
    t0 = time.process_time()
    sweep = acdc_sweep(m, clean, corrupt, thresholds=args.thresholds, graph=g)
    t_sweep = time.process_time() - t0
    for t, a, b, c in zip(args.thresholds, rounds, sweep, before):
        assert np.array_equal(a.values, b.values) and np.array_equal(a.values, c.values), f"the circuits differ at {t}"
    f_rounds = sum(r.metadata["forwards"] for r in rounds)
    masks_rounds = sum(r.metadata["masks_evaluated"] for r in rounds)
    print("| search | CPU s | forwards | masks evaluated | kept edges per threshold |")
    print("|---|---|---|---|---|")
    kept = ", ".join(str(int(r.values.sum())) for r in sweep)
    print(f"| rounds + einsum receivers (previous code), one acdc call per threshold | {t_before:.1f} | {f_rounds} | "
          f"{masks_rounds} | {kept} |")
    print(f"| rounds + matmul receivers, one acdc call per threshold | {t_rounds:.1f} | {f_rounds} | {masks_rounds} | {kept} |")
    print(f"| speculative + matmul receivers, one acdc_sweep | {t_sweep:.1f} | {sweep[-1].metadata['forwards']} | "
          f"{sweep[-1].metadata['masks_evaluated']} | {kept} |")
    print(f"speed-up over the previous code {t_before / t_sweep:.2f}x (rounds with matmul receivers: "
          f"{t_rounds / t_sweep:.2f}x); the circuits agree at every threshold")


def _einsum_apply(self, x, ctx):
    """The edge receiver as the previous code computed it: one einsum over every row."""
    diffs = torch.cat(self.state.diffs, dim=2)
    mask = self.mask.to(device=x.device, dtype=x.dtype).repeat_interleave(self.rows, dim=0)
    if x.ndim == 5:
        return x + torch.einsum("bpsd,bsrh->bprhd", diffs, mask)
    return x + torch.einsum("bpsd,bs->bpd", diffs, mask)


if __name__ == "__main__":
    main()
