"""``crosspatch extract MODEL --task T [--out DIR]``: recover the algorithm a network learned as a
standalone Python program, verified against the network and the task's ground truth, and write the
program, the verification report and the traces to a folder. A recurrent network of the algorithmic
tasks (a ``TaskRNN``) goes through MIPS (``crosspatch.methods.mips``); any other model through
transformer decompilation (``crosspatch.methods.decompile``). Exit code 1 when the program does not
verify."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

__all__ = ["add_extract"]

EXIT_UNSOLVED = 1


def add_extract(sub: Any) -> None:
    p = sub.add_parser(
        "extract",
        help="extract a verified Python program from a trained network (MIPS for RNNs, decompiling transformers)",
        description=(
            "Extract the algorithm MODEL learned as a standalone Python program and verify it: equal to the "
            "network on every input up to length 12 (or 10^5 random ones when there are too many) and to the "
            "task's ground truth at longer lengths. Writes program.py, verification.json and a plot (the "
            "hidden-state lattice of an RNN, the pruned graph of a transformer) to --out. MODEL is a zoo name "
            "(e.g. rnn-parity-last2). Exit code 1 when the program does not verify."
        ),
    )
    p.add_argument("model", metavar="MODEL", help="zoo name of the trained network")
    p.add_argument("--task", metavar="T", help="the algorithmic task giving the ground truth (default: the zoo entry's)")
    p.add_argument("--out", metavar="DIR", help="report folder (default: ./extract-MODEL)")
    p.add_argument("--json", action="store_true", help="print the verification report as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_extract)


def _zoo_model(name: str) -> Any:
    """The zoo model ``name``, loaded once for whichever extractor reads it; None when it is not in the zoo."""
    from ..zoo import store

    try:
        store.get(name)
    except store.ZooError:
        return None
    return store.load(name)


def _cmd_extract(args: argparse.Namespace) -> int:
    out = Path(args.out) if args.out else Path(f"extract-{args.model}")
    progress = False if args.no_progress else None
    from ..zoo.algorithmic.rnn import TaskRNN

    loaded = _zoo_model(args.model)
    if loaded is not None and isinstance(loaded.model, TaskRNN):
        from ..methods.mips import extract_program

        result = extract_program(loaded, args.task, out, progress=progress)
        if args.json:
            print(json.dumps(result.to_dict(), indent=2, default=str))
        else:
            verdict = "solved" if result.solved else f"not solved: {result.reason}"
            print(f"{args.model} ({result.task}): {verdict}")
            if result.verification is not None:
                v = result.verification
                print(f"  network: {v.network_checked - v.network_mismatches} of {v.network_checked} inputs equal "
                      f"({v.network_mode}, length {v.length}); ground truth: "
                      f"{v.truth_checked - v.truth_mismatches} of {v.truth_checked} at lengths {v.truth_lengths}")
            for label, path in result.files.items():
                print(f"  {label}: {path}")
        return 0 if result.solved else EXIT_UNSOLVED
    from ..methods.decompile import extract_program as decompile

    report = decompile(loaded if loaded is not None else args.model, args.task, out, progress=progress)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, default=str))
    else:
        print(f"{args.model}: {'decompiles' if report.decompiles else 'does not decompile'}")
        for label, path in report.files.items():
            print(f"  {label}: {path}")
    return 0 if report.decompiles else EXIT_UNSOLVED
