"""``crosspatch run``: run a study file into a report folder, or check that a report folder's study
reproduces its results bit for bit (``--check``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import PROG, CLIError

__all__ = ["add_run"]


_DESCRIPTION = (
    "Run the analyses of a study file (model, inputs, metric, seed, [[analysis]] tables; see docs/explorer.md) "
    "into a report folder: index.html, explorer.html, a JSON and CSV per result, study.toml and study.json. "
    "Given a report folder, runs its study.toml again."
)


def add_run(sub) -> None:
    p = sub.add_parser("run", help="run a study file (TOML) into a report folder", description=_DESCRIPTION)
    p.add_argument("study", metavar="STUDY", help="a study file, or a report folder written by 'crosspatch run'")
    p.add_argument("--out", metavar="DIR", help="report folder (default: the study's output, else crosspatch-out)")
    p.add_argument("--check", action="store_true",
                   help="rerun the study of a report folder and compare every result bit for bit (exit 1 if any "
                        "differs)")
    p.set_defaults(func=_cmd_run)


def _cmd_run(args: argparse.Namespace) -> int:
    from ..study import StudyError, check_study, load_study, run_study

    path = Path(args.study).expanduser()
    try:
        if args.check:
            if args.out is not None:
                raise CLIError("--check reruns into a temporary folder and compares; it takes no --out")
            if not path.is_dir():
                raise CLIError(f"--check takes a report folder written by '{PROG} run', got {args.study}")
            check = check_study(path)
            if check.ok:
                print(f"reproduced {len(check.compared)} result(s) bit for bit: {', '.join(check.compared)}")
                return 0
            print(f"{PROG}: {len(check.differing)} of {len(check.compared)} result(s) differ from the saved ones: "
                  f"{', '.join(check.differing)}", file=sys.stderr)
            return 1
        study = load_study(path)
        out = run_study(study, args.out)
    except StudyError as exc:
        raise CLIError(" ".join(str(exc).split())) from None
    print(out.resolve())
    return 0
