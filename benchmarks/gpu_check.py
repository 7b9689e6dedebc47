"""Accelerator check: conformance on CUDA, one timed sweep, AtP and EAP against TransformerLens on the same GPU.

Run from the bench venv on a machine with a GPU: ``.venv-bench/bin/python benchmarks/gpu_check.py``.
Prints one table and exits non-zero when a check fails or results disagree; without a CUDA device it
says so and exits with status 2 (nothing was checked). ``--device cpu`` runs the same steps on the CPU
(small sizes), to try the script where there is no GPU.

Rows: the adapter conformance suite (``crosspatch.testing.check_adapter``, its CUDA check included) on a
tiny GPT-2 moved to the device; a ``resid_pre`` sweep of a 12-layer d_model 768 GPT-2 (random weights)
against ``transformer_lens.patching.get_act_patch_resid_pre`` (effects compared, wall time after
``torch.cuda.synchronize``); AtP of every head against TransformerLens's hook AtP; EAP of every edge in
forward-equivalents of TransformerLens's bare forward (TransformerLens has no EAP of its own: its hook
AtP is the same forward and backward). Peak memory: ``torch.cuda.max_memory_allocated`` per call.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

TOL = 1e-3  # TF32 and fused kernels on a GPU: effects agree to about 1e-4 of logits of a few units


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int) -> tuple[float, float, object]:
    """Median wall time (s) of ``repeats`` calls after a warm-up, peak extra memory (MiB), the last result."""
    out = fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - start)
    peak = float("nan")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        peak = (torch.cuda.max_memory_allocated(device) - before) / 2**20
    return statistics.median(times), peak, out


def mib(peak: float) -> str:
    return "" if peak != peak else f" ({peak:.0f} MiB)"  # NaN: no peak measured (CPU)


def conformance(device: torch.device) -> tuple[str, bool]:
    from transformers import GPT2Config, GPT2LMHeadModel

    from crosspatch.testing.check import check_adapter

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=4, n_embd=64, vocab_size=100, n_positions=32)).eval().to(device)
    ids = torch.randint(0, 100, (3, 8), device=device)
    report = check_adapter(model, ids, cuda=device.type == "cuda")
    failures = "; ".join(report.failures) if not report.ok else ""
    return ("every check passed" if report.ok else f"FAILED: {failures}"), report.ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--seq", type=int, default=None, help="tokens (default 128 on a GPU, 16 on a CPU)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--layers", type=int, default=None, help="default 12 on a GPU, 2 on a CPU")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device is visible to torch (torch.cuda.is_available() is False); nothing was "
              "checked. Run it on a machine with a GPU, or with --device cpu to try the script.")
        sys.exit(2)
    on_gpu = device.type == "cuda"
    seq = args.seq or (128 if on_gpu else 16)
    layers = args.layers or (12 if on_gpu else 2)

    from peers import Crosspatch, Setup, TransformerLens
    from crosspatch.methods.edges import eap

    rows: list[tuple[str, str, str, str, str]] = []
    ok = True
    text, passed = conformance(device)
    ok &= passed
    rows.append(("conformance suite (tiny GPT-2)", text, "-", "-", "-"))

    setup = Setup(layers, seq, args.batch, d_model=768, heads=12)
    model, clean, corrupt, answer, distractor = (x.to(device) for x in setup.build())
    cp = Crosspatch(model, clean, corrupt, answer, distractor)
    tl = TransformerLens(model, clean, corrupt, answer, distractor)

    t_bare_tl, _, _ = timed(lambda: tl.bare(clean), device, args.repeats)
    t_bare, _, _ = timed(lambda: cp.bare(clean), device, args.repeats)
    t_cp, m_cp, ours = timed(cp.resid_pre_sweep, device, args.repeats)
    t_tl, m_tl, theirs = timed(tl.resid_pre_sweep, device, 1)
    err = float((torch.as_tensor(ours).to(device).double() - theirs.double()).abs().max())
    ok &= err <= TOL
    rows.append((f"resid_pre sweep {setup.label}", f"max abs diff {err:.1e}", f"{t_cp:.3f} s{mib(m_cp)}",
                 f"{t_tl:.3f} s{mib(m_tl)}", f"{t_tl / t_cp:.1f}x"))

    t_cp, m_cp, ours = timed(cp.atp_heads, device, args.repeats)
    t_tl, m_tl, theirs = timed(tl.atp_heads, device, args.repeats)
    err = float((torch.as_tensor(ours).to(device).double() - theirs.double()).abs().max())
    ok &= err <= TOL
    rows.append(("AtP, every head", f"max abs diff {err:.1e}", f"{t_cp * 1e3:.1f} ms = {t_cp / t_bare:.2f} fwd{mib(m_cp)}",
                 f"{t_tl * 1e3:.1f} ms = {t_tl / t_bare_tl:.2f} fwd{mib(m_tl)}", f"{t_tl / t_cp:.1f}x"))

    t_cp, m_cp, res = timed(lambda: eap(cp.m, clean, corrupt, cp.metric), device, args.repeats)
    finite = bool(torch.isfinite(torch.as_tensor(res.values)).all())
    ok &= finite
    rows.append((f"EAP, {res.values.size} edges", "finite" if finite else "NOT FINITE",
                 f"{t_cp * 1e3:.1f} ms = {t_cp / t_bare:.2f} fwd{mib(m_cp)}",
                 f"hook AtP (one forward and backward): {t_tl / t_bare_tl:.2f} fwd", "-"))

    name = torch.cuda.get_device_name(device) if on_gpu else "CPU"
    print(f"device: {name}; torch {torch.__version__}; bare forward: crosspatch's HF {t_bare * 1e3:.1f} ms, "
          f"TransformerLens {t_bare_tl * 1e3:.1f} ms")
    print()
    print("| check | result | crosspatch | TransformerLens | TransformerLens / crosspatch |")
    print("|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
