"""Side-by-side benchmark: crosspatch against TransformerLens, pyvene and nnsight on the same weights.

Run from the bench venv (``make bench``): ``.venv-bench/bin/python benchmarks/run_all.py``.
First checks that every library's patching results agree (max abs difference <= 1e-4), then times
hook overhead, the resid_pre sweep, the head_out sweep and attribution patching, and measures peak
memory. Every number is a ratio against a baseline measured in the same run (median of repeats).

Peak memory on CPU: before each measurement the process's peak RSS is reset (``/proc/self/clear_refs``
with ``5``) after ``gc`` and ``malloc_trim``; the result is the peak RSS reached during the call minus
the RSS before it, the median of 3 calls. On CUDA it is ``torch.cuda.max_memory_allocated`` (not
exercised here: no GPU).
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from common import paired, rss_peak  # noqa: E402
from peers import LIBS, Crosspatch, Setup  # noqa: E402

TOL = 1e-4
# With one torch thread, the process's CPU time is what a call costs; other jobs on a shared machine
# inflate the wall clock but not it. `--clock wall` measures elapsed time instead.
CLOCK = time.process_time


MEMORY_TASKS = ("capture", "resid_pre_sweep", "head_out_sweep", "atp_heads")


def timed(fn, repeats: int, warmup: bool = True) -> float:
    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        start = CLOCK()
        fn()
        times.append(CLOCK() - start)
    return statistics.median(times)


def peak_memory(fn) -> float:
    """Peak extra memory (bytes) of one call of ``fn``."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    return rss_peak(fn)[0]


def uptime() -> str:
    return open("/proc/loadavg").read().split()[0:3].__str__()


def machine() -> str:
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    nproc = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
    import transformers

    versions = [f"torch {torch.__version__}", f"transformers {transformers.__version__}"]
    for mod in ("transformer_lens", "pyvene", "nnsight"):
        try:
            from importlib.metadata import version

            versions.append(f"{mod} {version(mod)}")
        except Exception:  # noqa: BLE001
            pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{platform.machine()}, `nproc` = {nproc}, CPU: {cpu}, {gpu}; {', '.join(versions)}; "
        f"torch threads {torch.get_num_threads()}; Python {platform.python_version()}"
    )


def check_agreement(libs: dict) -> list[str]:
    ref = libs["crosspatch"]
    lines = []
    for task in ("resid_pre_sweep", "head_out_sweep", "atp_heads"):
        want = getattr(ref, task)().double()
        scale = float(want.abs().max())
        for name, lib in libs.items():
            for variant, label in ((task, name), (f"{task}_cached", f"{name} (source cached)")):
                if name == "crosspatch" or not hasattr(lib, variant):
                    continue
                got = torch.as_tensor(getattr(lib, variant)()).double()
                err = float((got - want).abs().max())
                ok = "ok" if err <= TOL else "DISAGREE"
                lines.append(f"{task:16s} {label:16s} max|diff| {err:.2e} (max|effect| {scale:.3f}) {ok}")
    return lines


def floors(cp: Crosspatch, setup: Setup) -> dict[str, float]:
    """The physical floor of each sweep, in bare forwards: the sum over sites of the fraction of blocks and
    positions a patch can change. A patch at layer ``l`` changes blocks ``l..`` (``(L - l) / L``) and, in this
    causal model, only positions from the first one where the patched value differs from the base run's
    (``(T - p) / T``); a site whose value is the same in both runs changes nothing (0)."""
    L, T = setup.layers, setup.seq
    clean = cp.m.run(cp.clean, capture=["resid_pre.*", "head_z.*"]).cache
    corrupt = cp.m.run(cp.corrupt, capture=["resid_pre.*", "head_z.*"]).cache

    def first_difference(a: torch.Tensor, b: torch.Tensor) -> int | None:
        along = (a != b).movedim(1, 0).reshape(a.shape[1], -1).any(dim=1)  # [pos]
        return int(along.long().argmax()) if bool(along.any()) else None

    resid = head = 0.0
    for layer in range(L):
        a, b = clean[f"resid_pre.{layer}"], corrupt[f"resid_pre.{layer}"]
        for pos in range(T):
            if not torch.equal(a[:, pos], b[:, pos]):
                resid += (L - layer) / L * (T - pos) / T
        z, w = clean[f"head_z.{layer}"], corrupt[f"head_z.{layer}"]  # [batch, pos, head, d_head]
        for h in range(z.shape[2]):
            first = first_difference(z[:, :, h], w[:, :, h])
            if first is not None:
                head += (L - layer) / L * (T - first) / T
    return {"resid_pre_sweep": resid, "head_out_sweep": head}


def bench_size(setup: Setup, repeats: int, only=None) -> dict:
    args = setup.build()
    model, clean = args[0], args[1]
    # Each library wraps its own copy of the same weights: nnsight and pyvene leave wrappers / hooks on
    # the module they are given, which must not slow the others (or the bare baseline) down.
    libs = {cls.name: cls(copy.deepcopy(model), *args[1:]) for cls in LIBS if only is None or cls.name in only}
    baseline = Crosspatch(model, *args[1:])  # the pristine model: the bare HF forward
    res = {"setup": setup, "load": uptime()}
    res["agreement"] = check_agreement(libs)
    cp, tl = libs["crosspatch"], libs.get("TransformerLens")

    # (1) hook overhead: capture of every resid_pre and resid_post vs the bare HF forward (interleaved)
    fns = {"hf_bare": lambda: baseline.bare(clean), "crosspatch": lambda: cp.capture(clean)}
    if tl is not None:
        fns["tl_bare"] = lambda: tl.bare(clean)
        fns["TransformerLens"] = lambda: tl.capture(clean)
    if "nnsight" in libs:
        fns["nnsight"] = lambda: libs["nnsight"].capture(clean)
    res["forward"] = paired(fns, max(repeats, 40), CLOCK)

    # (2)-(3) sweeps: median of `repeats`; the loops of hundreds of forwards need no warm-up
    for task in ("resid_pre_sweep", "head_out_sweep"):
        res[task] = {}
        for name, lib in libs.items():
            res[task][name] = timed(getattr(lib, task), repeats, warmup=False)
            if hasattr(lib, f"{task}_cached"):
                res[task][f"{name} (source cached)"] = timed(getattr(lib, f"{task}_cached"), repeats, warmup=False)
    res["floor"] = floors(cp, setup)
    for variant in ("every_site", "recompute"):
        res["resid_pre_sweep"][f"crosspatch_{variant}"] = timed(getattr(cp, f"resid_pre_sweep_{variant}"), repeats)
    # (4) attribution, counted in bare forwards: interleaved with them round by round
    atp = {"hf_bare": lambda: baseline.bare(clean), "crosspatch": cp.atp_heads, "crosspatch_unshared": cp.atp_heads_unshared}
    if tl is not None:
        atp.update({"tl_bare": lambda: tl.bare(clean), "TransformerLens": tl.atp_heads})
    res["atp_heads"] = paired(atp, max(repeats, 11), CLOCK)
    # (5) peak memory of each: the median of 3 calls (one RSS peak is noisy)
    res["memory"] = {}
    for task in MEMORY_TASKS:
        for name, lib in libs.items():
            if task == "capture" and name == "pyvene" or task != "capture" and not hasattr(lib, task):
                continue  # pyvene's capture and AtP are not written (see peers.py)
            fn = (lambda lib=lib: lib.capture(clean)) if task == "capture" else getattr(lib, task)
            res["memory"][(task, name)] = statistics.median(peak_memory(fn) for _ in range(3))
    res["load_end"] = uptime()
    return res


def report(results: list[dict]) -> str:
    out = []
    peers = ["TransformerLens", "pyvene", "nnsight"]  # the memory table
    out.append("| size | load (start / end) | capture every resid site vs bare HF forward: crosspatch | TransformerLens (vs its bare) | nnsight |")
    out.append("|---|---|---|---|---|")
    for r in results:
        s, f = r["setup"], r["forward"]
        tl = f"{f['TransformerLens'] / f['tl_bare']:.2f}x ({f['tl_bare'] / f['hf_bare']:.2f}x HF)" if "TransformerLens" in f else "-"
        nn = f"{f['nnsight'] / f['hf_bare']:.2f}x" if "nnsight" in f else "-"
        out.append(
            f"| {s.label} | {r['load']} / {r['load_end']} | "
            f"**{f['crosspatch'] / f['hf_bare']:.3f}x** (bare {f['hf_bare'] * 1e3:.1f} ms) | {tl} | {nn} |"
        )
    peer_columns = ["TransformerLens", "pyvene (source cached)", "pyvene", "nnsight"]
    label = {"pyvene": "pyvene, source re-run in every call (uncached)"}
    for task, title in (("resid_pre_sweep", "resid_pre sweep (layers x positions)"), ("head_out_sweep", "head_out sweep (layers x heads)")):
        variants = [v for v in ("every_site", "recompute") if task == "resid_pre_sweep"]
        heads = {"every_site": "crosspatch, every site run (TransformerLens x slower)",
                 "recompute": "crosspatch, every site, no prefix reuse (TransformerLens x slower)"}
        out.append("")
        out.append(f"| {title} | sites | floor (bare forwards) | crosspatch (x floor) | "
                   + " | ".join(f"{label.get(p, p)} (x floor; x slower than crosspatch)" for p in peer_columns)
                   + "".join(f" | {heads[v]}" for v in variants) + " | crosspatch bare forwards per site |")
        out.append("|---|---|---|---|" + "---|" * (len(peer_columns) + len(variants)) + "---|")
        for r in results:
            s, t = r["setup"], r[task]
            sites = s.layers * (s.seq if task == "resid_pre_sweep" else s.heads)
            floor_s = r["floor"][task] * r["forward"]["hf_bare"]
            cells = [f"{t[p]:.2f} s ({t[p] / floor_s:.1f}; {t[p] / t['crosspatch']:.2f}x)" if p in t else "-" for p in peer_columns]
            for v in variants:
                own = t[f"crosspatch_{v}"]
                cells.append(f"{own:.3f} s" + (f" ({t['TransformerLens'] / own:.2f}x)" if "TransformerLens" in t else ""))
            out.append(
                f"| {s.label} | {sites} | {r['floor'][task]:.2f} | {t['crosspatch']:.3f} s (**{t['crosspatch'] / floor_s:.2f}**) | "
                + " | ".join(cells) + f" | {t['crosspatch'] / (sites * r['forward']['hf_bare']):.2f} |"
            )
    out.append("")
    out.append("| attribution patching, all heads | crosspatch | forward-equivalents (bare HF forwards) | pair differing at position 0 too (nothing shared) | TransformerLens hook AtP | its forward-equivalents (bare TL forwards) |")
    out.append("|---|---|---|---|---|---|")
    for r in results:
        s, t = r["setup"], r["atp_heads"]
        tl = f"{t['TransformerLens'] * 1e3:.1f} ms | {t['TransformerLens'] / t['tl_bare']:.2f}" if "TransformerLens" in t else "- | -"
        out.append(f"| {s.label} | {t['crosspatch'] * 1e3:.1f} ms | **{t['crosspatch'] / t['hf_bare']:.2f}** | "
                   f"{t['crosspatch_unshared'] / t['hf_bare']:.2f} | {tl} |")
    out.append("")
    out.append("| peak extra memory (MiB) | task | crosspatch | " + " | ".join(peers) + " |")
    out.append("|---|---|---|" + "---|" * len(peers))
    for r in results:
        s, m = r["setup"], r["memory"]
        for task in MEMORY_TASKS:
            cells = [f"{m[(task, p)] / 2**20:.1f}" if (task, p) in m else "-" for p in ["crosspatch", *peers]]
            out.append(f"| {s.label} | {task} | " + " | ".join(cells) + " |")
    out.append("")
    out.append("Agreement (crosspatch vs each peer, same weights, denoising logit-diff effects):")
    out.append("")
    out.append("```")
    for r in results:
        s = r["setup"]
        out.extend(f"{s.label}: {line}" for line in r["agreement"])
    out.append("```")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes", default="4x16x8,8x16x8,4x16x32", help="layers x seq x batch, comma-separated (default: ~9 min here)"
    )
    parser.add_argument("--pairs", default="middle,first",
                        help="which token the corrupt prompt changes: the middle one, and/or position 1 ('first')")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: the 2 cores are shared)")
    parser.add_argument("--only", default=None, help="comma-separated library names")
    parser.add_argument("--out", default=None, help="write the markdown tables here")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                        help="cpu: process CPU time (default; robust to other jobs with one thread); wall: elapsed")
    args = parser.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    only = args.only.split(",") if args.only else None
    results = []
    header = f"{machine()}; clock: {'process CPU time' if args.clock == 'cpu' else 'wall clock'}"
    print(header, flush=True)
    for spec in args.sizes.split(","):
        layers, seq, batch = (int(x) for x in spec.split("x"))
        start = time.perf_counter()
        for pair in args.pairs.split(","):
            results.append(bench_size(Setup(layers, seq, batch, pair=pair), args.repeats, only))
            print(f"size {spec} ({pair} pair) done in {time.perf_counter() - start:.0f} s, load {uptime()}", flush=True)
            text = report(results)
            if args.out:
                with open(args.out, "w") as f:
                    f.write(header + "\n\n" + text + "\n")
    print(text)
    bad = [line for r in results for line in r["agreement"] if "DISAGREE" in line]
    if bad:
        print("\nDISAGREEMENT:\n" + "\n".join(bad))
        sys.exit(1)


if __name__ == "__main__":
    main()
