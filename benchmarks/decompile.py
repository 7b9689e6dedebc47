"""Decompiling transformers: the four tracr programs and small transformers trained here on algorithmic tasks.

For each model: components kept by optimal-ablation pruning, the primitive each was matched to (with
how much of its attention pattern / output the primitive reproduces), and the emitted program's
agreement with the network and with the task's answer on every input of the verified lengths
(tracr: lengths 1..5, every sequence; trained: lengths 1..8, every sequence). Trained models come
from the zoo (``<task>-transformer``: trained on first use, then cached); their training time and
held-out accuracy are the zoo build's.

    python benchmarks/decompile.py                      # everything: writes benchmarks/decompile.md
    python benchmarks/decompile.py --tracr-only --out /tmp/decompile.md
    python benchmarks/decompile.py --tasks parity-last2 bit-shift-right --reports /tmp/decompile-reports
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

import crosspatch as cp
from crosspatch.adapters.tracr import TracrAdapter, load
from crosspatch.methods.decompile import extract_program
from crosspatch.methods.decompile.trained import DECOMPILE_TASKS

HERE = Path(__file__).resolve().parent
DATA = HERE.parent / "tests" / "data" / "tracr"
PROGRAMS = ["reverse", "frac_prevs", "sort_unique", "hist"]


def _ops(report) -> list[dict]:
    rows = []
    for op in report.program.operations:
        rows.append({"node": op.node, "out": op.out, "primitive": op.describe(), "agreement": round(op.agreement, 4),
                     "pattern_fit": round(getattr(op, "pattern_fit", float("nan")), 4)})
    return rows


def run_tracr(name: str, reports: Path | None, steps: int) -> dict:
    model = load(DATA, name)
    start = time.perf_counter()
    r = extract_program(cp.wrap(model, TracrAdapter()), out=reports / name if reports else None, progress=False,
                        ablation_steps=steps)
    v = r.verification
    truth_nodes = sorted(n for n in model.meta["circuit"]["nodes"] if n != "embed")
    return {"kind": "tracr", "name": name, "seconds": round(time.perf_counter() - start, 1), "kept": r.graph.kept,
            "compiled_nodes": truth_nodes, "nodes": len(r.graph.nodes), "inputs": v.inputs, "sequences": v.sequences,
            "model_sequences": v.model_sequences, "defined_sequences": v.defined_sequences,
            "defined_model_sequences": v.defined_model_sequences, "model_accuracy": v.model_accuracy,
            "decompiles": r.decompiles, "decompiles_where_defined": v.equivalent_where_defined, "ops": _ops(r)}


def run_trained(task: str, reports: Path | None, steps: int) -> dict:
    name = f"{task}-transformer"
    start = time.perf_counter()
    loaded = cp.zoo.load(name, progress=False)
    load_seconds = time.perf_counter() - start
    start = time.perf_counter()
    r = extract_program(name, out=reports / name if reports else None, progress=False, ablation_steps=steps)
    v = r.verification
    fits = [op.pattern_fit for op in r.program.operations if hasattr(op, "pattern_fit")]
    return {"kind": "trained", "name": name, "task": task, "train_seconds": loaded.info.get("train_seconds"),
            "load_seconds": round(load_seconds, 1), "model_task_accuracy": loaded.info.get("accuracy"),
            "seconds": round(time.perf_counter() - start, 1), "kept": r.graph.kept, "nodes": len(r.graph.nodes),
            "inputs": v.inputs, "sequences": v.sequences, "model_sequences": v.model_sequences,
            "model_accuracy": v.model_accuracy, "truth_accuracy": v.truth_accuracy,
            "truth_sequences": v.truth_sequences, "model_truth_sequences": v.model_truth_sequences,
            "decompiles": r.decompiles, "min_pattern_fit": min(fits) if fits else None,
            "min_agreement": min(op.agreement for op in r.program.operations), "ops": _ops(r)}


def render(rows: list[dict], seconds: float) -> str:
    lines = [
        "# Decompiling transformers (`benchmarks/decompile.py`)",
        "",
        f"Measured on {platform.machine()} CPU, torch {torch.__version__}, one thread; {seconds:.0f} s in all. "
        "`crosspatch.methods.decompile.extract_program` with 40 Adam steps of optimal ablation per component; "
        "the emitted program is executed and compared with the network on every sequence of every verified length.",
        "",
        "## tracr programs (lengths 1..5, every sequence)",
        "",
        "| program | kept / components | kept = compiled blocks | program = model | where the model's output is defined | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["kind"] != "tracr":
            continue
        same = sorted(r["kept"]) == r["compiled_nodes"]
        lines.append(f"| {r['name']} | {len(r['kept'])} / {r['nodes']} | {'yes' if same else 'no'} | "
                     f"{r['model_sequences']} / {r['sequences']} | {r['defined_model_sequences']} / {r['defined_sequences']} | "
                     f"{r['seconds']} |")
    lines += ["", "Primitives matched:", "", *_programs(rows, "tracr")]
    lines += [
        "",
        "## Transformers trained here (2 layers x 2 heads, d_model 64; lengths 1..8, every sequence)",
        "",
        "| task | model accuracy (held out) | kept / components | program = model (sequences) | program = model (positions) "
        "| program = truth (positions) | decompiles | weakest head match (pattern fit / output agreement) | train s | extract s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["kind"] != "trained":
            continue
        fit = "-" if r["min_pattern_fit"] is None else f"{r['min_pattern_fit']:.3f}"
        heads = [o for o in r["ops"] if o["node"].startswith("head_out")]
        agree = "-" if not heads else f"{min(o['agreement'] for o in heads):.3f}"
        lines.append(f"| {r['task']} | {r['model_task_accuracy']} | {len(r['kept'])} / {r['nodes']} | "
                     f"{r['model_sequences']} / {r['sequences']} | {r['model_accuracy']:.4f} | {r['truth_accuracy']:.4f} | "
                     f"{'yes' if r['decompiles'] else 'no'} | {fit} / {agree} | {r['train_seconds']} | {r['seconds']} |")
    lines += ["", "Programs:", "", *_programs(rows, "trained")]
    return "\n".join(lines) + "\n"


def _programs(rows: list[dict], kind: str) -> list[str]:
    return [f"- **{r.get('task', r['name'])}**: " + "; ".join(f"`{o['node']}` {o['out']} = {o['primitive']}" for o in r["ops"])
            for r in rows if r["kind"] == kind]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", nargs="*", default=list(DECOMPILE_TASKS))
    ap.add_argument("--tracr-only", action="store_true")
    ap.add_argument("--steps", type=int, default=40, help="Adam steps of optimal ablation per component")
    ap.add_argument("--reports", type=Path, default=None, help="write each model's report folder here")
    ap.add_argument("--out", type=Path, default=HERE / "decompile.md")
    args = ap.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    rows = []
    for name in PROGRAMS:
        rows.append(run_tracr(name, args.reports, args.steps))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "ops"}), flush=True)
    if not args.tracr_only:
        for task in args.tasks:
            rows.append(run_trained(task, args.reports, args.steps))
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "ops"}), flush=True)
    args.out.write_text(render(rows, time.perf_counter() - start))
    if args.reports is not None:
        (args.reports / "rows.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
