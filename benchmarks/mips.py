"""MIPS on the zoo's recurrent networks: which algorithmic tasks come out as a verified Python program.

For every ``rnn-<task>`` zoo entry (those already trained, unless ``--train``), run
``crosspatch.methods.mips.extract_program`` and record whether the program is solved (equal to the
network on every input up to length 12, exhaustively where the alphabet allows, else on 10^5 seeded
random sequences, and to the task's ground truth at lengths 16, 24 and 40), the route (finite-state
machine or integer lattice), the regression families used, why it failed otherwise, and the seconds.
The solved count is printed next to MIPS's 32 of 62 (Michaud et al. 2024, arXiv 2402.05110). Networks
the search did not bring to 100 % are listed apart (MIPS only extracts from networks that solve the task).

    python benchmarks/mips.py                                   # writes benchmarks/mips.md and mips.json
    python benchmarks/mips.py --tasks parity-last2 sum-all --reports /tmp/mips-reports
    python benchmarks/mips.py --train                           # build missing zoo entries first (slow)
    python benchmarks/mips.py --from-dir DIR                    # TaskRNNs saved as DIR/<task>.pt ({shape, state})
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from crosspatch.methods.mips import extract_program
from crosspatch.zoo import store
from crosspatch.zoo.algorithmic.rnn import RNNShape, TaskRNN
from crosspatch.zoo.algorithmic.tasks import algorithmic_tasks

HERE = Path(__file__).resolve().parent
MIPS_SOLVED, MIPS_TASKS = 32, 62


def _zoo_sources(tasks: list[str] | None, train: bool) -> list[tuple[str, object, dict]]:
    names = sorted(n for n in store.models() if n.startswith("rnn-"))
    if tasks:
        names = [n for n in names if n.removeprefix("rnn-") in tasks]
    out = []
    for name in names:
        if not train and not store.cached(name):
            continue
        loaded = store.load(name, progress=False)
        out.append((store.get(name).task or name.removeprefix("rnn-"), name, dict(loaded.info)))
    return out


def _dir_sources(folder: Path, tasks: list[str] | None) -> list[tuple[str, object, dict]]:
    out = []
    for path in sorted(folder.glob("*.pt")):
        if tasks and path.stem not in tasks:
            continue
        saved = torch.load(path)
        net = TaskRNN(RNNShape.from_dict(saved["shape"]))
        net.load_state_dict(saved["state"])
        out.append((path.stem, net, {"success": saved.get("success", True)}))
    return out


def _trained_ok(info: dict) -> bool:
    for key in ("success", "solved"):
        if key in info:
            return bool(info[key])
    metrics = info.get("metrics", info)
    acc = metrics.get("accuracy", metrics.get("test_accuracy"))
    return acc is None or float(acc) >= 1.0


def run(task: str, source: object, info: dict, reports: Path | None) -> dict:
    start = time.perf_counter()
    if not _trained_ok(info):
        acc = info.get("accuracy")
        return {"task": task, "solved": False, "trained_ok": False, "seconds": 0.0,
                "shape": info.get("shape"), "reason": f"the search found no network at 100 % (best held-out accuracy "
                f"{acc if acc is None else round(float(acc), 3)}); not extracted"}
    try:
        r = extract_program(source, task, reports / task if reports else None, progress=False)
    except Exception as exc:  # a crash is a result too: recorded, not hidden
        return {"task": task, "solved": False, "reason": f"{type(exc).__name__}: {exc}",
                "seconds": round(time.perf_counter() - start, 1), "trained_ok": _trained_ok(info)}
    net = source if isinstance(source, TaskRNN) else store.load(source, progress=False).model
    v = r.verification
    return {
        "task": task, "model": r.model, "shape": net.shape.to_dict(), "trained_ok": _trained_ok(info),
        "solved": r.solved, "route": r.route, "reason": r.reason, "machine_states": r.machine_states,
        "lattice": r.lattice, "fits": r.fits, "quantised": r.quantised, "normalised_equal": r.normalised_equal,
        "network": None if v is None else f"{v.network_checked - v.network_mismatches}/{v.network_checked} {v.network_mode}",
        "truth": None if v is None else f"{v.truth_checked - v.truth_mismatches}/{v.truth_checked}",
        "program": r.program, "program_lines": len((r.program or "").splitlines()),
        "tables": r.program is not None and ("NEXT = {" in r.program or "OUTPUT = {" in r.program),
        "seconds": round(time.perf_counter() - start, 1),
    }


def _shape(s: dict | None) -> str:
    if not s:
        return ""
    return f"n={s['hidden_dim']} f{tuple(s['f_hidden']) or '()'} g{tuple(s['g_hidden']) or '()'}"


def write_markdown(rows: list[dict], path: Path, seconds: float) -> None:
    tasks = algorithmic_tasks()
    good = [r for r in rows if r.get("trained_ok", True)]
    solved = [r for r in good if r["solved"]]
    lines = [
        "# MIPS on the zoo's recurrent networks",
        "",
        "Written by `python benchmarks/mips.py` (see its docstring). A task is solved when the emitted program",
        "equals the network on every input up to length 12 (exhaustive where the alphabet allows, else 10^5",
        "seeded random sequences) and the task's ground truth on 900 held-out sequences of lengths 16, 24, 40.",
        "",
        f"**Solved: {len(solved)} of {len(good)} tasks with a network at 100 %** "
        f"(MIPS, Michaud et al. 2024: {MIPS_SOLVED} of {MIPS_TASKS}); "
        f"{len(rows)} networks in the run, {len(rows) - len(good)} below 100 % listed apart. "
        f"Extraction time {seconds:.0f} s in total on {platform.machine()} "
        f"({torch.get_num_threads()} torch thread(s)).",
        "",
        f"Of the solved programs, {sum(1 for r in solved if not r.get('tables'))} "
        f"are formulas only; the others keep a lookup table for the update or the output of a finite machine "
        f"(verified all the same, but less of an explanation). Zoo entries not yet trained when the run "
        f"started are not in the table.",
        "",
        "| task | MIPS name | network | solved | route | structure | regression | seconds | why not |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (not r.get("trained_ok", True), not r["solved"], r["task"])):
        t = tasks.get(r["task"])
        structure = ""
        if r.get("machine_states"):
            structure = f"{r['machine_states']} states"
        elif r.get("lattice"):
            lat = r["lattice"]
            structure = f"{lat['dim']}-d {'Boolean' if lat['boolean'] else 'integer'} lattice"
        fits = ", ".join(sorted(set((r.get("fits") or {}).values())))
        mark = "yes" if r["solved"] else "no"
        if not r.get("trained_ok", True):
            mark += " (network < 100 %)"
        why = (r.get("reason") or "").replace("|", "/")
        lines.append(f"| {r['task']} | {getattr(t, 'mips_name', '') or ''} | {_shape(r.get('shape'))} | {mark} | "
                     f"{r.get('route') or ''} | {structure} | {fits} | {r['seconds']} | {why} |")
    lines += ["", "## Programs of the solved tasks", ""]
    for r in sorted(solved, key=lambda r: r["task"]):
        text = (r.get("program") or "").rstrip().splitlines()
        if not text or len(text) > 60:  # a long lookup table: its size, not its text
            lines += [f"### {r['task']}", "", f"A program of {r.get('program_lines', len(text))} lines (a lookup "
                      f"table of the machine; `--reports DIR` writes it).", ""]
            continue
        lines += [f"### {r['task']}", "", "```python", *text, "```", ""]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="*", help="only these tasks")
    p.add_argument("--train", action="store_true", help="build zoo entries that are not trained yet")
    p.add_argument("--from-dir", type=Path, help="read TaskRNNs saved as <task>.pt instead of the zoo")
    p.add_argument("--reports", type=Path, help="write each task's report folder here")
    p.add_argument("--out", type=Path, default=HERE / "mips.md")
    p.add_argument("--rewrite", action="store_true", help="only rewrite --out from the JSON next to it")
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.rewrite:
        saved = json.loads(args.out.with_suffix(".json").read_text())
        write_markdown(saved["rows"], args.out, saved["seconds"])
        return
    torch.set_num_threads(1)
    sources = _dir_sources(args.from_dir, args.tasks) if args.from_dir else _zoo_sources(args.tasks, args.train)
    start = time.perf_counter()
    rows = []
    for task, source, info in sources:
        row = run(task, source, info, args.reports)
        rows.append(row)
        print(f"{task}: {'solved' if row['solved'] else 'not solved: ' + row['reason']} ({row['seconds']} s)", flush=True)
    total = time.perf_counter() - start
    write_markdown(rows, args.out, total)
    kept = [{**r, "program": r.get("program") if len((r.get("program") or "").splitlines()) <= 60 else None} for r in rows]
    args.out.with_suffix(".json").write_text(json.dumps({"seconds": round(total, 1), "rows": kept}, indent=2) + "\n")
    print(f"solved {sum(r['solved'] for r in rows if r.get('trained_ok', True))} of "
          f"{sum(1 for r in rows if r.get('trained_ok', True))} (MIPS: {MIPS_SOLVED} of {MIPS_TASKS}); {total:.0f} s")


if __name__ == "__main__":
    main()
