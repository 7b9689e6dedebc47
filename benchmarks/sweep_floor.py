"""A resid_pre sweep against its physical floor at GPT-2 small's geometry, with the peers beside it.

Run from the bench venv: ``.venv-bench/bin/python benchmarks/sweep_floor.py`` (12 layers, d_model 768,
12 heads, vocab 1000, random weights with ``initializer_range`` 0.1; 1 torch thread; process CPU time).

The **floor** of an exact sweep is what a patch can change: a patch of ``resid_pre.l[pos=p]`` in a
causal model changes blocks ``l..`` at positions ``p..`` only, a fraction ``(L - l) / L * (T - p) / T``
of one forward, and a site whose source value equals the base value (bit for bit, on every prompt)
changes nothing (0). The floor is the sum over the sweep's sites, in bare forwards of the prompts
(the HF model's own forward, timed in the same process, interleaved with the sweeps round by round).
Each implementation's time is reported as a multiple of it. crosspatch's time includes its two setup
forwards (the base run and the source run); their share is stated.

At T = 32 every site of the ``[layers, positions]`` grid is patched; at longer T the sweep covers every
layer at an evenly spaced subset of positions (and the position where the pair differs), so that the
floor stays a few dozen forwards. The peers (TransformerLens's ``generic_activation_patch`` over the
same sites, pyvene with the source cached and uncached, nnsight) run one whole forward per site, so
they are timed on a sample of the sites and their time for the sweep is extrapolated (labelled),
after checking their effects on the sample against crosspatch's.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from peers import LIBS, Crosspatch, Setup  # noqa: E402

CLOCK = time.process_time
TOL = 1e-4


def sites_for(setup: Setup, positions: int) -> list[tuple[int, int]]:
    stride = max(1, setup.seq // positions)
    chosen = sorted(set(range(0, setup.seq, stride)) | {setup.differs_at})
    return [(layer, pos) for layer in range(setup.layers) for pos in chosen]


def floor_of(sites, skipped, layers: int, seq: int) -> float:
    return sum((layers - l) / layers * (seq - p) / seq for (l, p), skip in zip(sites, skipped) if not skip)


def run(setup: Setup, positions: int, repeats: int, peer_sites: int, only, unbatched: bool) -> dict:
    model, clean, corrupt, answer, distractor = setup.build()
    cp = Crosspatch(model, clean, corrupt, answer, distractor)
    sites = sites_for(setup, positions)
    names = [f"resid_pre.{l}[pos={p}]" for l, p in sites]
    result = cp.resid_pre_result(names)
    skipped = list(result.skipped.reshape(-1))
    values = torch.as_tensor(result.values).reshape(-1)
    floor = floor_of(sites, skipped, setup.layers, setup.seq)
    n = clean.shape[0]

    fns = {
        "bare": lambda: cp.bare(clean),
        "crosspatch": lambda: cp.resid_pre_result(names),
        # one site that is skipped (position 0 holds the same token in both prompts): the two setup forwards
        "setup": lambda: cp.resid_pre_result(["resid_pre.0[pos=0]"]),
    }
    if unbatched:
        fns["one_site_per_forward"] = lambda: cp.cp.activation_patching(
            cp.m, clean, corrupt, names, cp.metric, progress=False, batch_size=n)
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            reps = 3 if k in ("bare", "setup") else 1
            for _ in range(reps):
                start = CLOCK()
                fn()
                times[k].append(CLOCK() - start)
    med = {k: statistics.median(v) for k, v in times.items()}

    # peers on a sample of the sites, extrapolated to the sweep
    ran = [i for i, skip in enumerate(skipped) if not skip]  # a sample of the sites with an effect
    index = ran[:: max(1, len(ran) // peer_sites)][:peer_sites]
    sample = [sites[i] for i in index]
    peers = {}
    agreement = []
    for cls in LIBS[1:]:
        if only and cls.name not in only:
            continue
        lib = cls(copy.deepcopy(model), clean, corrupt, answer, distractor)
        variants = [("", "resid_pre_sites")]
        if cls.name == "pyvene":
            variants = [(" (source cached)", "resid_pre_sites_cached"), (" (source re-run per site)", "resid_pre_sites")]
        for suffix, method in variants:
            fn = getattr(lib, method)
            fn(sample[:1])  # warm-up
            start = CLOCK()
            got = torch.as_tensor(fn(sample)).reshape(-1).double()
            spent = CLOCK() - start
            err = float((got - values[index].double()).abs().max())
            agreement.append(f"{cls.name}{suffix}: max|diff| {err:.2e} on {len(sample)} sites "
                             f"(max|effect| {float(values.abs().max()):.3f}) {'ok' if err <= TOL else 'DISAGREE'}")
            # a peer runs one whole forward per site (and TransformerLens / nnsight one clean run first)
            peers[cls.name + suffix] = spent / len(sample) * len(sites)
        del lib
    return {"setup": setup, "sites": len(sites), "run": int(result.metadata["sites_run"]), "floor": floor,
            "times": med, "peers": peers, "sample": len(sample), "agreement": agreement}


def report(rows: list[dict]) -> str:
    peer_names = list(dict.fromkeys(p for r in rows for p in r["peers"]))
    out = ["| size | sites (run) | floor (bare forwards) | bare forward | crosspatch | x floor | setup share | "
           "one site per forward, x floor |" + "".join(f" {p}, x floor |" for p in peer_names),
           "|---|---|---|---|---|---|---|---|" + "---|" * len(peer_names)]
    for r in rows:
        s, t = r["setup"], r["times"]
        floor_s = r["floor"] * t["bare"]
        unb = f"{t['one_site_per_forward']:.2f} s, {t['one_site_per_forward'] / floor_s:.2f}" if "one_site_per_forward" in t else "-"
        cells = [f"{r['peers'][p]:.1f} s*, {r['peers'][p] / floor_s:.2f}" if p in r["peers"] else "-" for p in peer_names]
        out.append(
            f"| {s.label} | {r['sites']} ({r['run']}) | {r['floor']:.2f} | {t['bare'] * 1e3:.0f} ms | {t['crosspatch']:.2f} s | "
            f"**{t['crosspatch'] / floor_s:.2f}** | {t['setup'] / t['crosspatch']:.0%} | {unb} |" + "".join(f" {c} |" for c in cells)
        )
    out.append("")
    out.append("\\* extrapolated: time per site on a sample of the sites x the sweep's sites (they run one whole "
               "forward per site). Agreement on the samples:")
    out.append("")
    out.append("```")
    for r in rows:
        out.extend(f"{r['setup'].label}: {line}" for line in r["agreement"])
    out.append("```")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", default="32,128,512")
    parser.add_argument("--pairs", default="middle,first")
    parser.add_argument("--batch", type=int, default=1, help="prompts")
    parser.add_argument("--positions", default="32,16,8", help="positions swept per seq (evenly spaced)")
    parser.add_argument("--repeats", default="3,3,1", help="rounds per seq")
    parser.add_argument("--peer-sites", type=int, default=12)
    parser.add_argument("--unbatched-up-to", type=int, default=128, help="also time one site per forward up to this seq")
    parser.add_argument("--only", default=None, help="comma-separated peer names")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    seqs = [int(x) for x in args.seqs.split(",")]
    positions = [int(x) for x in args.positions.split(",")]
    repeats = [int(x) for x in args.repeats.split(",")]
    only = args.only.split(",") if args.only else None
    rows = []
    for i, seq in enumerate(seqs):
        for pair in args.pairs.split(","):
            setup = Setup(12, seq, args.batch, d_model=768, heads=12, pair=pair)
            start = time.perf_counter()
            rows.append(run(setup, positions[min(i, len(positions) - 1)], repeats[min(i, len(repeats) - 1)],
                            args.peer_sites, only, seq <= args.unbatched_up_to))
            print(f"{setup.label}: {time.perf_counter() - start:.0f} s, load {open('/proc/loadavg').read().split()[:3]}",
                  flush=True)
            text = report(rows)
            if args.out:
                with open(args.out, "w") as f:
                    f.write(text + "\n")
    print(text)
    if any("DISAGREE" in line for r in rows for line in r["agreement"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
