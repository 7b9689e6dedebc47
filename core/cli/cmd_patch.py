"""``crosspatch patch``: activation patching of a model on counterfactual pairs of a text task, one
sweep per ``--sites`` pattern, written as heatmaps, JSON, CSV and ``index.html`` into ``--out``.
What can be checked without loading (or training) the model is checked first; torch, the methods
and the report writer are imported only when the command runs."""

from __future__ import annotations

import argparse
from typing import Any, Sequence

from ..zoo.sources import find_model
from .errors import CLIError
from .model_options import add_model_options, load_model, parse_device

__all__ = ["add_patch"]

_DEFAULT_SITES = ("resid_pre.*[pos=*]", "head_out.*[head=*]")
_METRICS = ("logit_diff", "probability", "kl")


def add_patch(sub: Any) -> None:
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
    add_model_options(p)
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
    parse_device(args.device)
    loaded = load_model(args.model, args)
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
