"""The algorithmic-task RNN zoo: every ``rnn-<task>`` network searched and trained here, and what it reached.

For each task the zoo entry is built (the MIPS-style search of crosspatch.zoo.algorithmic.search with
the zoo's settings, one torch thread) and the table records the shape found, the parameters (and the
nonzero ones after the L1 stage), the accuracy on held-out sequences at lengths 1-12 (the search's
success criterion; exhaustive where a length has at most 4096 sequences), the accuracy at length 24
(beyond what the search checks), the training runs, wall and CPU seconds, and whether the search
succeeded. Tasks that never reach 100 % are listed as failures with the best network's accuracy.
The machine is shared: ``uptime`` is recorded before and after, and CPU seconds (this process only)
are reported beside wall seconds.

    python benchmarks/rnn_zoo.py                       # every task, rebuilt: rnn_zoo.md and rnn_zoo.json
    python benchmarks/rnn_zoo.py --tasks parity-last2 add-mod-3 --out /tmp/rnn.md
    python benchmarks/rnn_zoo.py --cached              # reuse builds in the zoo cache (their recorded seconds)
    python benchmarks/rnn_zoo.py --render              # rnn_zoo.md again from rnn_zoo.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from crosspatch import zoo
from crosspatch.zoo.algorithmic import ALGORITHMIC_TASKS, get_algorithmic_task

HERE = Path(__file__).resolve().parent


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_task(name: str, seed: int, cached: bool) -> dict:
    task = get_algorithmic_task(name)
    zname = f"rnn-{task.name}"
    cpu0, wall0 = time.process_time(), time.perf_counter()
    loaded = zoo.load(zname, seed=seed, progress=False) if cached else zoo.train(zname, seed=seed, progress=False)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    info = loaded.info
    from_cache = cached and wall < 0.5 * info["seconds"]
    if from_cache:  # the build's own record (CPU seconds are recorded by builds since they were added)
        wall, cpu = info["seconds"], info.get("cpu_seconds")
    shape = info["shape"]
    by_len = {int(k): v for k, v in info["accuracy_by_length"].items()}
    return {
        "task": task.name, "mips_name": task.mips_name, "output_kind": task.output_kind, "success": info["success"],
        "hidden": shape["hidden_dim"], "f_hidden": shape["f_hidden"], "g_hidden": shape["g_hidden"],
        "parameters": info["parameters"], "nonzero": info["nonzero_parameters"],
        "accuracy": min(by_len.values()), "accuracy_by_length": by_len, "beyond": info["beyond_accuracy"],
        "exhaustive_length": info.get("exhaustive_length"), "runs": len(info.get("attempts", [])),
        "search_seconds": info["seconds"], "wall_seconds": round(wall, 2),
        "cpu_seconds": None if cpu is None else round(cpu, 2), "from_cache": bool(from_cache),
    }


def _fmt_s(v: float | None) -> str:
    return "?" if v is None else f"{v:.1f}"


def _fmt_acc(v: float) -> str:
    return "1" if v == 1.0 else f"{min(v, 0.99999):.5f}"


def render(data: dict) -> str:
    rows = data["rows"]
    solved = [r for r in rows if r["success"]]
    mips_rows = [r for r in rows if r["mips_name"]]
    lines = [
        "# RNN zoo: the smallest TaskRNN found per algorithmic task",
        "",
        "Written by `benchmarks/rnn_zoo.py` (the module docstring says what is measured). Each `rnn-<task>` zoo",
        "entry was built here: hidden size grown 1, 2, 4 ... (linear f and g first, then one ReLU layer each) to",
        "the first network at 100 % on held-out sequences of lengths 1-12, bisected down, MLP width halved while",
        "it still reaches 100 %, then L1 fine-tuning and pruning that keep 100 %. Training uses sequences of",
        "10 steps. `acc 1-12` is the lowest per-length held-out accuracy (exhaustive up to `exh.` steps);",
        "`acc 24` is at 24 steps, never checked by the search. `nonzero` counts parameters after the L1 stage.",
        "",
        f"- machine: {data['machine']}, torch {data['torch']}, {data['threads']} torch thread(s), seed {data['seed']}",
        *[f"- {note}" for note in data.get("notes", [])],
        f"- load before: `{data['uptime_before']}`",
        f"- load after: `{data['uptime_after']}`",
        f"- **solved {len(solved)} of {len(rows)} tasks** ({sum(r['success'] for r in mips_rows)} of the "
        f"{len(mips_rows)} MIPS tasks here; MIPS's Newton_Magnetic is not in the family)",
        f"- **total {data['total_wall_seconds'] / 60:.1f} min wall, {data['total_cpu_seconds'] / 60:.1f} min CPU** "
        f"(sums over the tasks' builds; the machine's 2 cores were shared, see the load)"
        + (f"; CPU not recorded for {len(data['cpu_unknown'])} task(s) built before CPU time was recorded"
           if data.get("cpu_unknown") else ""),
        "",
        "| task | MIPS name | out | solved | hidden | f | g | params | nonzero | acc 1-12 | exh. | acc 24 | runs | wall s | CPU s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['task']} | {r['mips_name'] or '(ours)'} | {r['output_kind']} | {'yes' if r['success'] else '**no**'} "
            f"| {r['hidden']} | {r['f_hidden'] or '-'} | {r['g_hidden'] or '-'} | {r['parameters']} | {r['nonzero']} "
            f"| {_fmt_acc(r['accuracy'])} | {r['exhaustive_length'] or '-'} | {_fmt_acc(r['beyond'])} | {r['runs']} "
            f"| {r['wall_seconds']:.1f} | {_fmt_s(r['cpu_seconds'])} |"
        )
    failed = [r for r in rows if not r["success"]]
    lines += ["", "## Not solved", ""]
    if failed:
        for r in failed:
            worst = min(r["accuracy_by_length"], key=r["accuracy_by_length"].get)
            lines.append(f"- {r['task']}: best network {_fmt_acc(r['accuracy'])} (worst at length {worst}), "
                         f"hidden {r['hidden']}, f {r['f_hidden'] or '-'}, g {r['g_hidden'] or '-'} after {r['runs']} runs")
    else:
        lines.append("- none")
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="*", default=None, help="task names (default: every task)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cached", action="store_true", help="reuse cached zoo builds (and their recorded seconds) "
                   "instead of retraining; build the missing ones")
    p.add_argument("--reverse", action="store_true", help="go through the tasks in reverse order")
    p.add_argument("--cpu-from", type=Path, default=None, help="an earlier run's JSON: CPU seconds of cached builds "
                   "that did not record them")
    p.add_argument("--note", action="append", default=[], help="a line for the table's header (repeatable)")
    p.add_argument("--out", type=Path, default=HERE / "rnn_zoo.md")
    p.add_argument("--render", action="store_true", help="only render the markdown from the JSON next to --out")
    args = p.parse_args(argv)
    json_path = args.out.with_suffix(".json")
    if args.render:
        args.out.write_text(render(json.loads(json_path.read_text())), encoding="utf-8")
        return
    torch.set_num_threads(1)
    os.environ.setdefault("CROSSPATCH_PROGRESS", "0")
    names = args.tasks or [t.name for t in ALGORITHMIC_TASKS]
    if args.reverse:
        names = names[::-1]
    data = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores", "torch": torch.__version__,
        "threads": torch.get_num_threads(), "seed": args.seed, "uptime_before": _uptime(), "rows": [],
    }
    cpu0, wall0 = time.process_time(), time.perf_counter()
    earlier = {}
    if args.cpu_from is not None:
        earlier = {r["task"]: r for r in json.loads(args.cpu_from.read_text())["rows"]}
    data["notes"] = list(args.note)
    for name in names:
        row = run_task(name, args.seed, args.cached)
        if row["cpu_seconds"] is None and row["task"] in earlier:
            row["cpu_seconds"] = earlier[row["task"]]["cpu_seconds"]
        data["rows"].append(row)
        print(f"{row['task']:>26}  {'solved' if row['success'] else 'NOT solved':>10}  hidden {row['hidden']:>2} "
              f"f {row['f_hidden']} g {row['g_hidden']}  acc {row['accuracy']:.4f}  acc24 {row['beyond']:.4f}  "
              f"{row['wall_seconds']:.1f}s wall {_fmt_s(row['cpu_seconds'])}s cpu", flush=True)
        data["total_wall_seconds"] = round(sum(r["wall_seconds"] for r in data["rows"]), 1)
        data["total_cpu_seconds"] = round(sum(r["cpu_seconds"] or 0.0 for r in data["rows"]), 1)
        data["cpu_unknown"] = [r["task"] for r in data["rows"] if r["cpu_seconds"] is None]
        data["this_run_wall_seconds"] = round(time.perf_counter() - wall0, 1)
        data["uptime_after"] = _uptime()
        json_path.write_text(json.dumps(data, indent=1), encoding="utf-8")  # partial results survive a stop
    args.out.write_text(render(data), encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
