"""``crosspatch verify MODEL``: every site family of a model checked (the conformance suite and the
adapter's own oracles) and printed as exact / approximate / unavailable / failed with the largest
error; exit code 1 when a family the model claims fails. ``--config TYPE`` verifies a tiny random
model of that kind instead (for transformers, any model type: ``--config gemma2``)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from .errors import CLIError
from .model_options import add_model_options, load_model

__all__ = ["add_verify"]

EXIT_FAILED = 1


def add_verify(sub: Any) -> None:
    p = sub.add_parser(
        "verify",
        help="check every site family of a model against the conformance oracles",
        description=(
            "Run the conformance suite and the adapter's per-family checks on a model and print, for every "
            "site family, whether it is exact, approximate, unavailable or failing, with the largest error. "
            "MODEL is a zoo name or a local checkpoint folder; --config TYPE builds a tiny random model instead. "
            "Exit code 1 when a family fails."
        ),
    )
    p.add_argument("model", metavar="MODEL", nargs="?", help="zoo name or local checkpoint folder")
    p.add_argument("--config", metavar="TYPE", help="verify a tiny random model of this kind (e.g. a transformers model type)")
    p.add_argument("--adapter", default=None, help="adapter name (default: the one the registry picks; 'transformers' with --config)")
    p.add_argument("--json", action="store_true", help="print the verdicts as JSON")
    add_model_options(p)
    p.set_defaults(func=_cmd_verify)


def _cmd_verify(args: argparse.Namespace) -> int:
    from ..engine.model import find_adapter
    from ..testing.verify import verify

    if (args.model is None) == (args.config is None):
        raise CLIError("give a MODEL or --config TYPE (one of them)")
    if args.config is not None:
        adapter = find_adapter(None, args.adapter or "transformers")  # type: ignore[arg-type]
        try:
            model = adapter.tiny_model(args.config)
        except (NotImplementedError, ValueError) as exc:
            raise CLIError(" ".join(str(exc).split())) from None
    else:
        model = load_model(args.model, args).model
        adapter = args.adapter
    result = verify(model.eval(), adapter=adapter, cuda=False if args.device in (None, "cpu") else None)
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.table())
    return 0 if result.ok else EXIT_FAILED
