"""``crosspatch patch``: activation patching of a model on counterfactual pairs of a text task, or on
``--clean``/``--corrupt`` texts of your own, one sweep per ``--sites`` pattern, written as heatmaps,
JSON, CSV and ``index.html`` into ``--out``. What can be checked without loading (or training) the
model is checked first (the arguments, the task, the output folder); torch, the methods and the
report writer are imported only when the command runs."""

from __future__ import annotations

import argparse
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from ..zoo.sources import find_model, tokenizer_files
from .errors import CLIError
from .model_options import add_model_options, load_model, parse_device

__all__ = ["add_patch", "add_pair_options", "pair_from_args", "ArgsPair", "tokenization_errors"]

_DEFAULT_SITES = ("resid_pre.*[pos=*]", "head_out.*[head=*]")
_METRICS = ("logit_diff", "probability", "kl")


def add_patch(sub: Any) -> None:
    p = sub.add_parser(
        "patch",
        help="activation patching on a task, written as a report",
        description=(
            "Run activation patching of a model on counterfactual pairs of a task (or on --clean and\n"
            "--corrupt texts), one sweep per --sites pattern, and write heatmaps, JSON, CSV and index.html\n"
            "into --out."
        ),
        epilog=(
            "examples:\n"
            "  crosspatch patch --model ioi-gpt2-tiny --sites 'head_out.*[head=*]' --normalize --out out\n"
            "  crosspatch patch --model ioi-gpt2-tiny \\\n"
            "      --clean 'When Mary and John went to the store, John gave a drink to' \\\n"
            "      --corrupt 'When Mary and John went to the store, Paul gave a drink to' \\\n"
            "      --answer ' Mary' --distractor ' John'"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--sites", nargs="+", metavar="PATTERN", default=list(_DEFAULT_SITES),
        help=f"site patterns, one sweep each (default: {' '.join(_DEFAULT_SITES)})",
    )
    add_pair_options(p)
    p.set_defaults(func=_cmd_patch)


def add_pair_options(p: argparse.ArgumentParser) -> None:
    """What every command running a method on counterfactual pairs takes: the model, the prompts (a task's or
    your own), the metric, the direction, the batch size and the report folder."""
    p.add_argument("--model", required=True, metavar="MODEL", help="zoo name or local checkpoint folder")
    p.add_argument("--task", help="task name (default: the zoo model's task)")
    texts = p.add_argument_group("your own prompts (instead of a task)")
    texts.add_argument("--clean", nargs="+", metavar="TEXT", help="clean prompts")
    texts.add_argument("--corrupt", nargs="+", metavar="TEXT", help="corrupt prompts, one per clean prompt")
    texts.add_argument("--answer", nargs="+", metavar="TEXT",
                       help="the clean prompts' next token (one shared, or one per prompt), e.g. ' Mary'")
    texts.add_argument("--distractor", nargs="+", metavar="TEXT",
                       help="the token the corruption points to (one shared, or one per prompt), e.g. ' John'")
    p.add_argument("--metric", choices=_METRICS, default="logit_diff",
                   help="logit_diff(answer, distractor) (default), probability(answer), or kl to the clean run")
    p.add_argument("--direction", choices=("denoising", "noising"), default="denoising",
                   help="denoising: clean into corrupt (default); noising: corrupt into clean")
    p.add_argument("--n", type=int, default=32, metavar="N", help="number of prompt pairs of the task (default 32)")
    p.add_argument("--split", choices=("train", "test"), default="test", help="task split (default test)")
    p.add_argument("--normalize", action="store_true", help="divide effects by the clean-corrupt metric gap")
    p.add_argument(
        "--batch-size", type=int, default=None, metavar="N",
        help="rows (sites x prompts) per forward (default as in Python: 64 on an accelerator, one site's prompts "
             "per forward on a CPU)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for drawing the prompts (default 0)")
    p.add_argument("--out", default="crosspatch-out", metavar="DIR", help="report folder (default crosspatch-out)")
    add_model_options(p)


@dataclass
class ArgsPair:
    """The counterfactual pairs a command's arguments name, checked and loaded: the wrapped model, clean and
    corrupt inputs, the metric, and what the report says about them."""

    name: str
    model_class: str
    m: Any
    clean: Any
    corrupt: Any
    metric: Any
    task_name: str | None
    prompts: str
    out_dir: Path

    def context(self, args: argparse.Namespace) -> dict[str, Any]:
        """The report's "what was run" lines."""
        from ..results.result import collect_versions

        describe = self.m.describe()
        return {
            "model": f"{self.name} ({describe.get('class', self.model_class)}, "
                     f"{describe.get('n_layers', '?')} layers)",
            "task": f"{self.task_name} ({args.split} split)" if self.task_name else "your prompts",
            "prompts": self.prompts,
            "metric": f"{self.metric.name}, {args.direction}" + (", normalised" if args.normalize else ""),
            "seed": f"prompts {args.seed}, model {args.model_seed}" if self.task_name else f"model {args.model_seed}",
            "versions": collect_versions(),
        }


def pair_from_args(args: argparse.Namespace) -> ArgsPair:
    """The options of :func:`add_pair_options`, checked (what needs no model first), the model loaded and the
    prompts tokenized; every mistake a one-line :class:`CLIError`."""
    import torch

    from ..engine.model import wrap
    from ..results import metrics as _metrics
    from ..zoo import store as zoo
    from ..zoo.tasks.base import tokenize_pairs

    # Everything that can be checked without loading (or training) the model comes first.
    _check_numbers(args)
    out_dir = _check_out(args.out)
    texts = _texts(args)
    found = find_model(args.model)
    task = task_name = None
    if texts is None:
        task_name, task = _task(args, found, zoo)
    parse_device(args.device)
    loaded = load_model(args.model, args)
    if loaded.tokenizer is None:
        if isinstance(found, Path):
            raise CLIError(f"the checkpoint folder {found} {tokenizer_files(found)}, and text prompts need one: save "
                           f"it there (tokenizer.save_pretrained(folder))")
        raise CLIError(f"model {loaded.name!r} has no tokenizer, and text prompts need one")

    m = wrap(loaded.model, tokenizer=loaded.tokenizer)
    if "logits" not in m.catalog.families:
        raise CLIError(
            f"model {loaded.name!r} ({type(loaded.model).__name__}) has no 'logits' output, and the --metric "
            f"choices read next-token logits; use a model with a language-model head, or call "
            f"crosspatch from Python with your own metric (see examples/minilm_study.py)"
        )
    with tokenization_errors():
        if texts is None:
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
            clean, corrupt, answer, distractor = data.clean, data.corrupt, data.answer, data.distractor
            first = data.pairs[0]
            prompts = (f"{len(data)} pairs, e.g. {first.clean!r} vs {first.corrupt!r} "
                       f"(answer {first.answer!r}, distractor {first.distractor!r})")
        else:
            clean, corrupt, answer, distractor = texts
            _check_lengths(m, clean, corrupt)
            prompts = f"{len(clean)} pair(s): {clean[0]!r} vs {corrupt[0]!r}" + (
                f" (answer {answer!r}, distractor {distractor!r})" if answer is not None else "")
        metric = _metric(args.metric, answer, distractor, _metrics)
    return ArgsPair(loaded.name, type(loaded.model).__name__, m, clean, corrupt, metric, task_name, prompts, out_dir)


@contextmanager
def tokenization_errors() -> Iterator[None]:
    """A text the tokenizer cannot take, as a one-line CLIError."""
    from ..engine.text import TokenizationError

    try:
        yield
    except TokenizationError as exc:
        raise CLIError(" ".join(str(exc).split())) from None


def _cmd_patch(args: argparse.Namespace) -> int:
    from ..methods import activation_patching
    from ..results.report import write_report
    from ..results.result import Result

    pair = pair_from_args(args)
    m = pair.m
    with tokenization_errors():
        _check_sites(m, args.sites, m.adapter.sizes(m.prepare(pair.clean)))
        results: dict[str, Result] = {}
        for pattern in args.sites:
            res = activation_patching(
                m, pair.clean, pair.corrupt, pattern, pair.metric,
                direction=args.direction, normalize=args.normalize, batch_size=args.batch_size,
            )
            res.metadata.update(seed=args.seed, task=pair.task_name, zoo_model=pair.name)
            results[_result_name(pattern, results)] = res
    title = f"Activation patching: {pair.name} on {pair.task_name or 'your prompts'}"
    out = write_report(results, pair.out_dir, title=title, context=pair.context(args))
    print(out.resolve())
    return 0


def _check_numbers(args: argparse.Namespace) -> None:
    if args.n < 1:
        raise CLIError(f"--n must be at least 1, got {args.n}")
    if args.batch_size is not None and args.batch_size < 1:
        raise CLIError(f"--batch-size must be at least 1 (rows per forward), got {args.batch_size}")


def _check_out(out: str) -> Path:
    """``--out`` must be a folder that exists or can be made, and be writable; checked before any work."""
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise CLIError(f"--out {out}: that is a file; the report is a folder, give a folder's name")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise CLIError(f"--out {out}: {existing} is a file, so no folder can be made below it")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".crosspatch-write-test-"):
            pass
    except OSError as exc:
        raise CLIError(f"--out {out}: cannot write in {existing} ({exc.strerror or exc})") from None
    return path


def _texts(args: argparse.Namespace) -> "tuple[list[str], list[str], Any, Any] | None":
    """``--clean``/``--corrupt``/``--answer``/``--distractor`` checked against each other and the metric."""
    given = {name: getattr(args, name) for name in ("clean", "corrupt", "answer", "distractor")}
    if all(v is None for v in given.values()):
        return None
    if given["clean"] is None or given["corrupt"] is None:
        raise CLIError("--clean and --corrupt come together: the corrupt prompts are patched into, the clean from")
    if args.task is not None:
        raise CLIError("give either --task or --clean/--corrupt prompts, not both")
    clean, corrupt = given["clean"], given["corrupt"]
    if len(clean) != len(corrupt):
        raise CLIError(f"{len(clean)} --clean prompts but {len(corrupt)} --corrupt prompts; they are paired one by one")
    needs = {"logit_diff": ("answer", "distractor"), "probability": ("answer",), "kl": ()}[args.metric]
    for name in needs:
        if given[name] is None:
            raise CLIError(f"--metric {args.metric} needs --{name} (the token it scores, e.g. ' Mary')")
    out = []
    for name in ("answer", "distractor"):
        value = given[name]
        if value is not None and len(value) not in (1, len(clean)):
            raise CLIError(f"--{name} takes one text shared by every prompt or one per prompt ({len(clean)}), "
                           f"got {len(value)}")
        out.append(None if value is None else (value[0] if len(value) == 1 else list(value)))
    return list(clean), list(corrupt), out[0], out[1]


def _task(args: argparse.Namespace, found: Any, zoo: Any) -> tuple[str, Any]:
    from ..zoo.tasks import get_task, tasks

    task_names = sorted(t if isinstance(t, str) else t.name for t in tasks())
    if args.task is not None and args.task not in task_names:
        raise CLIError(f"unknown task {args.task!r}{zoo.did_you_mean(args.task, task_names)}; "
                       f"tasks: {', '.join(task_names) or 'none registered'}")
    task_name = args.task or (found.task if isinstance(found, zoo.ZooModel) else None)
    if task_name is None:
        raise CLIError(
            f"model {args.model!r} has no default task; pass --task (tasks: {', '.join(task_names) or 'none'}) or "
            f"your own prompts with --clean/--corrupt"
        )
    task = get_task(task_name)
    if getattr(task, "modality", "text") != "text":
        raise CLIError(f"task {task_name!r} has {task.modality} inputs; 'patch' runs text tasks for now")
    limit = task.max_pairs(args.split) if hasattr(task, "max_pairs") else None
    if limit is not None and args.n > limit:
        raise CLIError(f"--n {args.n} is more than task {task_name!r} can generate: its {args.split} split has "
                       f"{limit} distinct pairs")
    return task_name, task


def _check_lengths(m: Any, clean: list[str], corrupt: list[str]) -> None:
    """Each clean prompt and its corrupt one must be as many tokens; else both tokenisations, on one line."""
    for a, b in zip(clean, corrupt):
        ta, tb = m.to_str_tokens(a), m.to_str_tokens(b)
        if len(ta) != len(tb):
            raise CLIError(
                f"--clean and --corrupt prompts tokenize to {len(ta)} and {len(tb)} tokens, and patching pairs them "
                f"position by position: clean {ta} vs corrupt {tb}; make them the same length (words of one token "
                f"each), or pad them and call crosspatch from Python with input_ids and an attention_mask"
            )


def _metric(name: str, answer: Any, distractor: Any, metrics: Any) -> Any:
    if name == "logit_diff":
        return metrics.logit_diff(answer, distractor)
    if name == "probability":
        return metrics.probability(answer)
    return metrics.kl_to_clean()


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


def _result_name(pattern: str, taken: Any) -> str:
    from ..sites.site import Site

    base = Site.parse(pattern).family
    name, n = base, 2
    while name in taken:
        name, n = f"{base}_{n}", n + 1
    return name
