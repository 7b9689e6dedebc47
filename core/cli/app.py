"""The ``crosspatch`` command line.

Each subcommand is a pair of functions: ``_add_<name>(subparsers)`` builds its
parser and sets ``func`` to ``_cmd_<name>(args) -> int``.  To add one, write
the pair and list the adder in :data:`_SUBCOMMANDS`.

Errors are reported as a single ``crosspatch: error: ...`` line on stderr with
exit code 2; ``-v`` adds debug logging (with tracebacks).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import warnings
from typing import Any, Callable, Sequence

from ..plugins import registry as _plugins
from ..zoo.sources import find_model, load_local, quiet_transformers
from .errors import CLIError
from .install import add_install, add_uninstall

__all__ = ["CLIError", "main"]

logger = logging.getLogger(__name__)

PROG = "crosspatch"
EXIT_ERROR = 2


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors raise instead of printing usage and exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise CLIError(f"{message} (see '{self.prog} --help')")


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("crosspatch")
    except Exception:
        return "unknown"


# -- crosspatch plugins --------------------------------------------------------


def _add_plugins(sub: Any) -> None:
    p = sub.add_parser(
        "plugins",
        help="list installed plugins and what they registered",
        description=(
            "List the plugins found through the 'crosspatch' entry-point group, what each "
            "registered (adapters, models, tasks, interventions) and any load errors. "
            "Filter with CROSSPATCH_PLUGINS (allow-list) and CROSSPATCH_DISABLE_PLUGINS."
        ),
    )
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    p.set_defaults(func=_cmd_plugins)


def _cmd_plugins(args: argparse.Namespace) -> int:
    registry = _plugins.get_registry()
    with warnings.catch_warnings():
        # Load problems are part of this command's output; don't repeat them as warnings.
        warnings.simplefilter("ignore", _plugins.PluginLoadWarning)
        infos = registry.plugins()
        errors = registry.errors()
    if args.json:
        print(json.dumps([info.to_dict() for info in infos], indent=2))
        return 0
    print(_plugins_table(infos, errors))
    return 0


def _registered_summary(info: _plugins.PluginInfo) -> str:
    parts = [
        f"{kind}: {', '.join(info.registered[kind])}"
        for kind in _plugins.KINDS
        if info.registered.get(kind)
    ]
    return "; ".join(parts) or "-"


def _plugins_table(infos: Sequence[_plugins.PluginInfo], errors: Sequence[str]) -> str:
    lines: list[str] = []
    if not infos:
        lines.append("No crosspatch plugins found.")
    else:
        rows = [("PLUGIN", "DISTRIBUTION", "STATUS", "REGISTERED")]
        for info in infos:
            dist = " ".join(x for x in (info.distribution, info.version) if x) or "(in code)"
            rows.append((info.name, dist, info.status, _registered_summary(info)))
        lines.extend(_format_rows(rows))
    if errors:
        lines.append("")
        lines.append(f"Load errors ({len(errors)}):")
        lines.extend(f"  - {e}" for e in errors)
    return "\n".join(lines)


def _format_rows(rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    out = []
    for row in rows:
        cells = [cell.ljust(w) for cell, w in zip(row, widths)] + [row[-1]]
        out.append("  ".join(cells).rstrip())
    return out


# -- options shared by the commands that load a model ---------------------------

_DTYPES = ("float32", "float64", "bfloat16", "float16")
_DEFAULT_SITES = ("resid_pre.*[pos=*]", "head_out.*[head=*]")
_METRICS = ("logit_diff", "probability", "kl")


def _add_model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--device", help="torch device, e.g. cpu, cuda:0, mps (default: where the model loads, cpu)")
    g.add_argument("--dtype", choices=_DTYPES, help="cast the model to this dtype (default: as stored)")
    g.add_argument(
        "--model-seed", type=int, default=0, metavar="N",
        help="which trained copy of a zoo model (its training seed; default 0)",
    )


class _Model:
    """A loaded model, from the zoo or a local folder."""

    def __init__(self, name: str, model: Any, tokenizer: Any, task: str | None, info: dict[str, Any]):
        self.name, self.model, self.tokenizer, self.task, self.info = name, model, tokenizer, task, info


def _load_model(spec: str, args: argparse.Namespace) -> _Model:
    """A zoo name or a local checkpoint folder -> the loaded model (zoo models train on first use)."""
    from ..zoo import store as zoo

    found = find_model(spec)
    device = _device(args.device)
    if isinstance(found, zoo.ZooModel):
        if found.trains and not zoo.cached(spec, seed=args.model_seed):
            print(f"{PROG}: training zoo model {spec!r} (seed {args.model_seed}) on first use...", file=sys.stderr)
        quiet = quiet_transformers() if found.adapter == "transformers" else contextlib.nullcontext()
        with quiet:
            loaded = zoo.load(spec, device=device, dtype=_dtype(args.dtype), seed=args.model_seed)
        return _Model(spec, loaded.model, loaded.tokenizer, found.task, dict(loaded.info))
    model, tokenizer = load_local(found)
    model = model.to(device=device, dtype=_dtype(args.dtype)) if (device or args.dtype) else model
    return _Model(str(found), model, tokenizer, None, {"path": str(found.resolve())})


def _device(name: str | None) -> Any:
    if name is None:
        return None
    import torch

    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise CLIError(f"--device {name!r}: {_one_line(exc)}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {name!r}: CUDA is not available here; use --device cpu")
    return device


def _dtype(name: str | None) -> Any:
    if name is None:
        return None
    import torch

    return getattr(torch, name)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


# -- crosspatch zoo ------------------------------------------------------------


def _add_zoo(sub: Any) -> None:
    p = sub.add_parser(
        "zoo",
        help="list and train the zoo's small models",
        description=(
            "The zoo: small models built from configs and trained on the project's tasks "
            "(cached under the user cache dir, CROSSPATCH_CACHE overrides), plus pretrained "
            "models shipped as packages."
        ),
    )
    zsub = p.add_subparsers(dest="zoo_command", metavar="ACTION", parser_class=_Parser, required=True)
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
            print("\n".join(_format_rows(table)))
            print("\nCACHED: trained and cached for seed 0 ('-': pretrained, nothing to train).")
        return 0

    entry = zoo.get(args.name)
    if not entry.trains:
        print(f"{args.name} is pretrained; there is nothing to train")
        return 0
    quiet = quiet_transformers() if entry.adapter == "transformers" else contextlib.nullcontext()
    with quiet:
        loaded = zoo.train(args.name, seed=args.seed, steps=args.steps)
    summary = ", ".join(f"{k}={v}" for k, v in loaded.info.items() if isinstance(v, (int, float, str)))
    print(f"trained {args.name} (seed {args.seed})" + (f": {summary}" if summary else ""))
    return 0


# -- crosspatch sites ----------------------------------------------------------


def _add_sites(sub: Any) -> None:
    p = sub.add_parser(
        "sites",
        help="list the intervention sites of a model",
        description=(
            "Print the site catalog of a model: every site family with its layers, axes and sizes. "
            "MODEL is a zoo name ('crosspatch zoo list') or a local HuggingFace checkpoint folder."
        ),
    )
    p.add_argument("model", metavar="MODEL", help="zoo name or local checkpoint folder")
    _add_model_options(p)
    p.set_defaults(func=_cmd_sites)


def _cmd_sites(args: argparse.Namespace) -> int:
    from ..engine.model import wrap

    loaded = _load_model(args.model, args)
    print(repr(wrap(loaded.model).sites()))
    return 0


# -- crosspatch patch ----------------------------------------------------------


def _add_patch(sub: Any) -> None:
    p = sub.add_parser(
        "patch",
        help="activation patching on a task, written as a report",
        description=(
            "Run activation patching of a model on counterfactual pairs of a task, one sweep per "
            "--sites pattern, and write heatmaps, JSON, CSV and index.html into --out."
        ),
        epilog="example: crosspatch patch --model ioi-gpt2-tiny --sites 'head_out.*[head=*]' --normalize --out out",
    )
    p.add_argument("--model", required=True, metavar="MODEL", help="zoo name or local checkpoint folder")
    p.add_argument("--task", help="task name (default: the zoo model's task)")
    p.add_argument(
        "--sites", nargs="+", metavar="PATTERN", default=list(_DEFAULT_SITES),
        help=f"site patterns, one sweep each (default: {' '.join(_DEFAULT_SITES)})",
    )
    p.add_argument("--metric", choices=_METRICS, default="logit_diff",
                   help="logit_diff(answer, distractor) (default), probability(answer), or kl to the clean run")
    p.add_argument("--direction", choices=("denoising", "noising"), default="denoising",
                   help="denoising: clean into corrupt (default); noising: corrupt into clean")
    p.add_argument("--n", type=int, default=32, metavar="N", help="number of prompt pairs (default 32)")
    p.add_argument("--split", choices=("train", "test"), default="test", help="task split (default test)")
    p.add_argument("--normalize", action="store_true", help="divide effects by the clean-corrupt metric gap")
    p.add_argument("--batch-size", type=int, default=64, metavar="N", help="rows per forward (default 64)")
    p.add_argument("--seed", type=int, default=0, help="seed for drawing the prompts (default 0)")
    p.add_argument("--out", default="crosspatch-out", metavar="DIR", help="report folder (default crosspatch-out)")
    _add_model_options(p)
    p.set_defaults(func=_cmd_patch)


def _cmd_patch(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from ..results import metrics as _metrics
    from ..methods import activation_patching
    from ..engine.model import wrap
    from ..results.report import write_report
    from ..results.result import Result, collect_versions
    from ..zoo.tasks import get_task, tasks
    from ..zoo.tasks.base import tokenize_pairs

    if args.n < 1:
        raise CLIError(f"--n must be at least 1, got {args.n}")
    # Everything that can be checked without loading (or training) the model comes first.
    from ..zoo import store as zoo

    task_names = sorted(t if isinstance(t, str) else t.name for t in tasks())
    if args.task is not None and args.task not in task_names:
        raise CLIError(f"unknown task {args.task!r}; tasks: {', '.join(task_names) or 'none registered'}")
    found = find_model(args.model)
    task_name = args.task or (found.task if isinstance(found, zoo.ZooModel) else None)
    if task_name is None:
        raise CLIError(
            f"model {args.model!r} has no default task; pass --task (tasks: {', '.join(task_names) or 'none'})"
        )
    task = get_task(task_name)
    if getattr(task, "modality", "text") != "text":
        raise CLIError(f"task {task_name!r} has {task.modality} inputs; 'patch' runs text tasks for now")
    _device(args.device)
    loaded = _load_model(args.model, args)
    if loaded.tokenizer is None:
        raise CLIError(f"model {loaded.name!r} has no tokenizer; text tasks need one")

    m = wrap(loaded.model)
    if "logits" not in m.catalog.families:
        raise CLIError(
            f"model {loaded.name!r} ({type(loaded.model).__name__}) has no 'logits' output, and the --metric "
            f"choices read next-token logits; use a model with a language-model head, or call "
            f"crosspatch.activation_patching from Python with your own metric (see examples/minilm_study.py)"
        )
    torch.manual_seed(args.seed)
    pairs = task.pairs(args.n, seed=args.seed, split=args.split)
    data = tokenize_pairs(pairs, loaded.tokenizer)
    unk = getattr(loaded.tokenizer, "unk_token_id", None)
    tensors = (data.clean, data.corrupt, data.answer, data.distractor)
    if unk is not None and any(bool((t == unk).any()) for t in tensors):
        raise CLIError(
            f"the tokenizer of model {loaded.name!r} does not know some words of task {task_name!r} "
            f"(they map to its unknown token); use a model trained on this task"
        )
    sizes = m.adapter.sizes(m.prepare(data.clean))
    _check_sites(m, args.sites, sizes)

    metric = {
        "logit_diff": lambda: _metrics.logit_diff(data.answer, data.distractor),
        "probability": lambda: _metrics.probability(data.answer),
        "kl": lambda: _metrics.kl_to_clean(),
    }[args.metric]()
    positions = _position_labels(loaded.tokenizer, data.clean[0].tolist())

    results: dict[str, Result] = {}
    for pattern in args.sites:
        res = activation_patching(
            m, data.clean, data.corrupt, pattern, metric,
            direction=args.direction, normalize=args.normalize, batch_size=args.batch_size,
        )
        res.metadata.update(seed=args.seed, task=task_name, zoo_model=loaded.name)
        if "pos" in res.dims:
            res = Result(res.values, res.dims, {**res.coords, "pos": positions}, res.metadata)
        results[_result_name(pattern, results)] = res

    first = data.pairs[0]
    context = {
        "model": f"{loaded.name} ({m.describe().get('class', type(loaded.model).__name__)}, "
                 f"{m.describe().get('n_layers', '?')} layers)",
        "task": f"{task_name} ({args.split} split)",
        "prompts": f"{len(data)} pairs, e.g. {first.clean!r} vs {first.corrupt!r} "
                   f"(answer {first.answer!r}, distractor {first.distractor!r})",
        "metric": f"{metric.name}, {args.direction}" + (", normalised" if args.normalize else ""),
        "seed": f"prompts {args.seed}, model {args.model_seed}",
        "versions": collect_versions(),
    }
    title = f"Activation patching: {loaded.name} on {task_name}"
    out = write_report(results, Path(args.out), title=title, context=context)
    print(out.resolve())
    return 0


def _check_sites(m: Any, patterns: Sequence[str], sizes: dict[str, int]) -> None:
    """Every pattern must fit the model's catalog; else one line naming it and the families."""
    from ..sites.site import SiteError

    for pattern in patterns:
        try:
            m.catalog.expand(pattern, sizes)
        except SiteError as exc:
            message = str(exc).splitlines()[0]
            if "Families:" not in message:
                message += f" (site families of {m.catalog.model_name}: {', '.join(m.catalog.families)})"
            raise CLIError(message) from None


def _position_labels(tokenizer: Any, ids: list[int]) -> list[str]:
    """'3 John'-style labels: position index and the token of the first prompt."""
    labels = []
    for i, token_id in enumerate(ids):
        text = tokenizer.decode([token_id]).strip() or repr(tokenizer.decode([token_id]))
        labels.append(f"{i} {text}")
    return labels


def _result_name(pattern: str, taken: Any) -> str:
    from ..sites.site import Site

    base = Site.parse(pattern).family
    name, n = base, 2
    while name in taken:
        name, n = f"{base}_{n}", n + 1
    return name


# -- parser and entry point -------------------------------------------------------

#: Adders for every subcommand, in the order ``--help`` lists them.
_SUBCOMMANDS: list[Callable[[Any], None]] = [
    _add_plugins, _add_zoo, _add_sites, _add_patch, add_install, add_uninstall,
]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Causal interventions inside neural networks.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {_version()}")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="debug logging to stderr (includes tracebacks)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for add in _SUBCOMMANDS:
        add(sub)
    return parser


def _show_warning(message: Any, category: Any, filename: Any, lineno: Any, file: Any = None, line: Any = None) -> None:
    label = "warning" if category is None else category.__name__
    print(f"{PROG}: {label}: {message}", file=sys.stderr if file is None else file)


#: crosspatch's user-facing errors, by module: printed without a type name. Looked up in
#: sys.modules so that catching them imports nothing (an error's module is already imported).
_USER_ERRORS = (
    ("crosspatch.sites.site", "SiteError"),
    ("crosspatch.zoo.store", "ZooError"),
    ("crosspatch.zoo.tasks.base", "TaskError"),
    ("crosspatch.engine.adapter", "AdapterError"),
)


def _user_errors() -> tuple[type, ...]:
    found = (getattr(sys.modules.get(module), name, None) for module, name in _USER_ERRORS)
    return tuple(cls for cls in found if isinstance(cls, type))


def _user_message(exc: BaseException) -> str:
    """One line: a site-parse error's caret drawing is dropped, other line breaks are folded."""
    text = str(exc.args[0]) if len(exc.args) == 1 else str(exc)  # LookupError: no repr quotes
    if "\n  " in text and text.rstrip().endswith("^"):
        text = text.split("\n", 1)[0]
    return " ".join(text.split())


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI and return its exit code (the console script exits with it)."""
    parser = build_parser()
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning  # one line per warning, no source echo
        try:
            args = parser.parse_args(argv)
            if args.verbose:
                logging.basicConfig(level=logging.DEBUG, format="%(name)s: %(message)s")
            if args.command is None:
                parser.print_help()
                return 0
            return int(args.func(args) or 0)
        except SystemExit as exc:  # --help / --version
            code = exc.code
            return code if isinstance(code, int) else (0 if code is None else EXIT_ERROR)
        except KeyboardInterrupt:
            print(f"{PROG}: interrupted", file=sys.stderr)
            return 130
        except CLIError as exc:
            print(f"{PROG}: error: {exc}", file=sys.stderr)
            return EXIT_ERROR
        except Exception as exc:
            logger.debug("unhandled error", exc_info=True)
            if isinstance(exc, _user_errors()):  # unknown model, site, task, adapter: say it plainly
                print(f"{PROG}: error: {_user_message(exc)}", file=sys.stderr)
                return EXIT_ERROR
            msg = " ".join(str(exc).split())
            print(f"{PROG}: error: {type(exc).__name__}: {msg}", file=sys.stderr)
            return EXIT_ERROR
