"""What the commands that run a model (``crosspatch sites``, ``crosspatch patch``) share: the
``model`` option group (``--device``, ``--dtype``, ``--model-seed``), the parsing of a device and
a dtype name (torch is imported only then), and :func:`load_model`, which turns a zoo name or a
local checkpoint folder into a loaded model, training a zoo model on first use."""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Any

from ..zoo.sources import find_model, load_local, quiet_transformers
from .errors import PROG, CLIError

__all__ = ["DTYPES", "LoadedModel", "add_model_options", "load_model", "parse_device", "parse_dtype"]

DTYPES = ("float32", "float64", "bfloat16", "float16")


def add_model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--device", help="torch device, e.g. cpu, cuda:0, mps (default: where the model loads, cpu)")
    g.add_argument("--dtype", choices=DTYPES, help="cast the model to this dtype (default: as stored)")
    g.add_argument(
        "--model-seed", type=int, default=0, metavar="N",
        help="which trained copy of a zoo model (its training seed; default 0)",
    )


class LoadedModel:
    """A loaded model, from the zoo or a local folder."""

    def __init__(self, name: str, model: Any, tokenizer: Any, task: str | None, info: dict[str, Any]):
        self.name, self.model, self.tokenizer, self.task, self.info = name, model, tokenizer, task, info


def load_model(spec: str, args: argparse.Namespace) -> LoadedModel:
    """A zoo name or a local checkpoint folder -> the loaded model (zoo models train on first use)."""
    from ..zoo import store as zoo

    found = find_model(spec)
    device = parse_device(args.device)
    if isinstance(found, zoo.ZooModel):
        if found.trains and not zoo.cached(spec, seed=args.model_seed):
            print(f"{PROG}: training zoo model {spec!r} (seed {args.model_seed}) on first use...", file=sys.stderr)
        quiet = quiet_transformers() if found.adapter == "transformers" else contextlib.nullcontext()
        with quiet:
            loaded = zoo.load(spec, device=device, dtype=parse_dtype(args.dtype), seed=args.model_seed)
        return LoadedModel(spec, loaded.model, loaded.tokenizer, found.task, dict(loaded.info))
    model, tokenizer = load_local(found)
    model = model.to(device=device, dtype=parse_dtype(args.dtype)) if (device or args.dtype) else model
    return LoadedModel(str(found), model, tokenizer, None, {"path": str(found.resolve())})


def parse_device(name: str | None) -> Any:
    """``--device`` -> a torch device (None: not given); a CLIError for a name torch does not know or absent CUDA."""
    if name is None:
        return None
    import torch

    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise CLIError(f"--device {name!r}: {_one_line(exc)}") from None
    if device.type == "meta":
        raise CLIError(f"--device {name!r}: the meta device holds shapes, not data, so no model runs there; "
                       f"use cpu, cuda[:N] or mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {name!r}: CUDA is not available here; use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise CLIError(f"--device {name!r}: MPS is not available here; use --device cpu")
    return device


def parse_dtype(name: str | None) -> Any:
    """``--dtype`` -> the torch dtype of that name (None: not given)."""
    if name is None:
        return None
    import torch

    return getattr(torch, name)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())
