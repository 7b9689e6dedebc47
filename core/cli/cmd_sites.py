"""``crosspatch sites MODEL``: the site catalog of a model (every site family with its layers,
axes and sizes), for a zoo name or a local HuggingFace checkpoint folder, loaded with the shared
model options; the engine is imported only when the command runs."""

from __future__ import annotations

import argparse
from typing import Any

from .errors import PROG, CLIError
from .model_options import add_model_options, load_model

__all__ = ["add_sites"]


def add_sites(sub: Any) -> None:
    p = sub.add_parser(
        "sites",
        help="list the intervention sites of a model",
        description=(
            "Print the site catalog of a model: every site family with its layers, axes and sizes. "
            "MODEL is a zoo name ('crosspatch zoo list') or a local HuggingFace checkpoint folder."
        ),
    )
    p.add_argument("model", metavar="MODEL", help="zoo name or local checkpoint folder")
    add_model_options(p)
    p.set_defaults(func=_cmd_sites)


def _cmd_sites(args: argparse.Namespace) -> int:
    from ..engine.model import wrap

    if not args.model.strip():
        raise CLIError(
            f"MODEL is empty ({args.model!r}); give a zoo name ('{PROG} zoo list' lists them) or the path of a "
            f"local checkpoint folder"
        )
    loaded = load_model(args.model, args)
    print(repr(wrap(loaded.model).sites()))
    return 0
