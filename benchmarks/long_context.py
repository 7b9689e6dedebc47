"""Long contexts: activation patching, AtP and EAP at GPT-2 small's geometry up to 1,024 tokens, against TransformerLens.

Run from the bench venv: ``.venv-bench/bin/python benchmarks/long_context.py`` (12 layers, d_model 768, 12
heads, vocab 1000, random weights, 1 prompt per pair, 1 torch thread). For each length T it measures, in
one process and one call each, the process CPU time and the peak extra resident memory (peak RSS reset
through ``/proc/self/clear_refs`` after ``gc`` and ``malloc_trim``, minus the RSS before the call; the
model's weights are not counted) of:

* activation patching of ``resid_pre`` at 4 layers x 3 positions from the differing token on (crosspatch);
  TransformerLens's ``generic_activation_patch`` over the same sites (its clean ``run_with_cache`` included);
* AtP of every head: crosspatch's ``attribution_patching`` and TransformerLens's hook AtP;
* EAP of every edge (crosspatch); TransformerLens has no EAP, its hook AtP is the same forward and backward.

Times are also given in bare forwards of the HF model at that length (measured in the same process).
The pair differs in the middle token. Effects are compared with TransformerLens's (max abs difference).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from common import rss_peak  # noqa: E402
from peers import Crosspatch, Setup, TransformerLens  # noqa: E402

def measure(fn):
    """``(CPU seconds, peak extra MiB, result)`` of one call."""
    spent = []

    def timed():
        start = time.process_time()
        out = fn()
        spent.append(time.process_time() - start)
        return out

    peak, out = rss_peak(timed)
    return spent[0], peak / 2**20, out


def run(seq: int) -> dict:
    setup = Setup(12, seq, 1, d_model=768, heads=12)
    model, clean, corrupt, answer, distractor = setup.build()
    cp = Crosspatch(model, clean, corrupt, answer, distractor)
    tl = TransformerLens(copy.deepcopy(model), clean, corrupt, answer, distractor)
    p = setup.differs_at
    sites = [(layer, pos) for layer in (0, 4, 8, 11) for pos in (p, p + seq // 8, seq - 1)]
    from crosspatch.methods.edges import eap

    cp.bare(clean)
    bare, _, _ = measure(lambda: cp.bare(clean))
    tl_bare, _, _ = measure(lambda: tl.bare(clean))
    res = {"seq": seq, "bare": bare, "tl_bare": tl_bare}
    res["ap"] = measure(lambda: cp.resid_pre_sites(sites))
    res["tl_ap"] = measure(lambda: tl.resid_pre_sites(sites))
    res["atp"] = measure(cp.atp_heads)
    res["tl_atp"] = measure(tl.atp_heads)
    res["eap"] = measure(lambda: eap(cp.m, clean, corrupt, cp.metric))
    res["diff_ap"] = float((torch.as_tensor(res["ap"][2]).double().reshape(-1) - res["tl_ap"][2].double().reshape(-1)).abs().max())
    res["diff_atp"] = float((torch.as_tensor(res["atp"][2]).double() - res["tl_atp"][2].double()).abs().max())
    res["sites"] = len(sites)
    return res


def report(rows: list[dict]) -> str:
    out = ["| T | bare forward (HF / TL) | activation patching, 12 sites: crosspatch | TransformerLens | AtP heads: crosspatch "
           "| TransformerLens | EAP, every edge: crosspatch | max abs diff (patching / AtP) |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        def cell(key, unit):
            t, mem, _ = r[key]
            return f"{t:.1f} s = {t / r[unit]:.2f} fwd, {mem:.0f} MiB"

        out.append(f"| {r['seq']} | {r['bare']:.2f} s / {r['tl_bare']:.2f} s | {cell('ap', 'bare')} | {cell('tl_ap', 'tl_bare')} | "
                   f"{cell('atp', 'bare')} | {cell('tl_atp', 'tl_bare')} | {cell('eap', 'bare')} | "
                   f"{r['diff_ap']:.1e} / {r['diff_atp']:.1e} |")
    if len(rows) > 1:
        a, b = rows[0], rows[-1]
        growth = b["seq"] / a["seq"]
        out.append("")
        out.append(f"Growth of the peak from T = {a['seq']} to {b['seq']} (x{growth:.0f} tokens): " + ", ".join(
            f"{name} x{b[key][1] / a[key][1]:.1f}" for name, key in (
                ("crosspatch patching", "ap"), ("TransformerLens patching", "tl_ap"), ("crosspatch AtP", "atp"),
                ("TransformerLens AtP", "tl_atp"), ("crosspatch EAP", "eap"))))
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", default="256,512,1024")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for seq in (int(x) for x in args.seqs.split(",")):
        start = time.perf_counter()
        rows.append(run(seq))
        print(f"T={seq}: {time.perf_counter() - start:.0f} s", flush=True)
        if args.out:
            with open(args.out, "w") as f:
                f.write(report(rows) + "\n")
    print(report(rows))


if __name__ == "__main__":
    main()
