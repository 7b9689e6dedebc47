"""``crosspatch zoo list`` and ``crosspatch zoo train``: the zoo's models (name, adapter, task,
cached or not, description) as a table or JSON, and training one now so that it is cached for
later commands. The zoo itself is imported only when the command runs."""

from __future__ import annotations

import argparse
import contextlib
import json
from typing import Any

from ..zoo.sources import quiet_transformers
from .errors import CLIError, Parser
from .tables import format_rows

__all__ = ["add_zoo"]


def add_zoo(sub: Any) -> None:
    p = sub.add_parser(
        "zoo",
        help="list and train the zoo's small models",
        description=(
            "The zoo: small models built from configs and trained on the project's tasks "
            "(cached under the user cache dir, CROSSPATCH_CACHE overrides), plus pretrained "
            "models shipped as packages."
        ),
    )
    zsub = p.add_subparsers(dest="zoo_command", metavar="ACTION", parser_class=Parser, required=True)
    ls = zsub.add_parser("list", help="name, adapter, task, cached or not, description")
    ls.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    tr = zsub.add_parser("train", help="train a zoo model now (and cache it)")
    tr.add_argument("name", metavar="NAME", help="zoo model name (see 'crosspatch zoo list')")
    tr.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    tr.add_argument(
        "--steps", type=int,
        help="training steps (default: the model's own; other step counts are cached apart, and "
             "'sites' and 'patch' use the default build)",
    )
    p.set_defaults(func=_cmd_zoo)


def _cmd_zoo(args: argparse.Namespace) -> int:
    from ..zoo import store as zoo

    if args.zoo_command == "list":
        rows = [
            {
                "name": name, "adapter": entry.adapter, "task": entry.task, "trains": entry.trains,
                "cached": zoo.cached(name) if entry.trains else None, "description": entry.description,
            }
            for name, entry in sorted(zoo.models().items())
        ]
        if args.json:
            print(json.dumps(rows, indent=2))
        elif not rows:
            print("The zoo is empty (no plugin registered a model).")
        else:
            table = [("NAME", "ADAPTER", "TASK", "CACHED", "DESCRIPTION")]
            for r in rows:
                cached = "-" if r["cached"] is None else ("yes" if r["cached"] else "no")
                table.append((r["name"], r["adapter"], r["task"] or "-", cached, r["description"]))
            print("\n".join(format_rows(table)))
            print("\nCACHED: trained and cached for seed 0 ('-': pretrained, nothing to train).")
        return 0

    if args.steps is not None and args.steps < 1:
        raise CLIError(f"--steps must be at least 1, got {args.steps} (leave it out for the model's own)")
    entry = zoo.get(args.name)
    if not entry.trains:
        print(f"{args.name} is pretrained; there is nothing to train")
        return 0
    quiet = quiet_transformers() if entry.adapter == "transformers" else contextlib.nullcontext()
    with quiet:
        loaded = zoo.train(args.name, seed=args.seed, steps=args.steps)
    print(f"trained {args.name} (seed {args.seed}), cached in {loaded.info.get('path')}")
    rows = _metric_rows(loaded.info.get("manifest", {}).get("metrics") or {})
    if rows:
        print("\n".join("  " + line for line in format_rows([("METRIC", "VALUE"), *rows])))
    return 0


def _metric_rows(metrics: dict[str, Any]) -> list[tuple[str, str]]:
    """The build's numbers as (name, value) rows: floats to 4 significant digits; text, lists and
    mappings (notes, the architecture) are left to the manifest."""
    rows = []
    for name, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        rows.append((name, f"{value:.4g}" if isinstance(value, float) else str(value)))
    return rows
