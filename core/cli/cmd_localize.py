"""``crosspatch localize``: coarse-to-fine localisation (``cp.localize``) of a model on counterfactual pairs of a
text task, or on ``--clean``/``--corrupt`` texts of your own: the picture, every site's value (exact where
verified, else AtP's estimate) as JSON and CSV, and the top sites printed. The model and prompt options are
``crosspatch patch``'s."""

from __future__ import annotations

import argparse
import json
from typing import Any

from .cmd_patch import add_pair_options, pair_from_args, tokenization_errors
from .errors import CLIError

__all__ = ["add_localize"]


def add_localize(sub: Any) -> None:
    p = sub.add_parser(
        "localize",
        help="coarse-to-fine localisation on a task: the top sites for a share of the sweep's forwards",
        description=(
            "Rank every layer, (layer, position) and (head or MLP, position) site by attribution patching and\n"
            "verify with exact patching until no unverified site can reach the threshold (cp.localize); write\n"
            "localize.png, localize.json and localize.csv into --out and print the top sites."
        ),
        epilog=(
            "examples:\n"
            "  crosspatch localize --model ioi-gpt2-6x16 --n 16 --k 20 --out out\n"
            "  crosspatch localize --model ioi-gpt2-tiny --tol 0.05 --normalize"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--tol", type=float, default=0.02, metavar="FRACTION",
                   help="what can be missed, as a fraction of the clean-corrupt gap (default 0.02)")
    p.add_argument("--k", type=int, default=None, metavar="K",
                   help="also rank the finest level's K largest sites exactly (default: only the threshold)")
    add_pair_options(p)
    p.set_defaults(func=_cmd_localize)


def _cmd_localize(args: argparse.Namespace) -> int:
    if not args.tol >= 0:
        raise CLIError(f"--tol must be >= 0 (a fraction of the clean-corrupt gap), got {args.tol}")
    if args.k is not None and args.k < 1:
        raise CLIError(f"--k must be at least 1, got {args.k}")
    from ..methods.localize import localize

    pair = pair_from_args(args)
    with tokenization_errors():
        try:
            loc = localize(pair.m, pair.clean, pair.corrupt, pair.metric, tol=args.tol, k=args.k,
                           direction=args.direction, normalize=args.normalize, batch_size=args.batch_size)
        except ValueError as exc:  # a model without the families localize walks, a gap of 0 ...
            raise CLIError(" ".join(str(exc).split())) from None
    out = pair.out_dir
    out.mkdir(parents=True, exist_ok=True)
    title = f"{pair.name} on {pair.task_name or 'your prompts'}"
    loc.plot(title=title).savefig(out / "localize.png", dpi=100)
    frame = loc.to_pandas()
    frame.to_csv(out / "localize.csv", index=False)
    summary = {key: loc.metadata[key] for key in ("tol", "k", "levels", "forwards", "sweep_forwards", "metric",
                                                    "direction", "normalize", "baseline", "n_prompts")}
    (out / "localize.json").write_text(json.dumps(
        {"context": pair.context(args), "summary": summary, "sites": frame.to_dict(orient="records")},
        indent=1, default=str))
    _print_top(loc)
    print(out.resolve())
    return 0


def _print_top(loc: Any) -> None:
    sweep = loc.metadata.get("sweep_forwards")
    spent = f"{loc.forwards} forwards" + (f" ({100 * loc.forwards / sweep:.1f} % of the sweep's {sweep})"
                                          if sweep else "")
    top = loc.top(loc.metadata.get("k") or 10)
    print(f"localize: {spent}; the finest level's top {len(top)}:")
    for row in top.itertuples():
        print(f"  {row.site:<32} {row.value:+.4f}  {'patched' if row.verified else 'estimate'}")
