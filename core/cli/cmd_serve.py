"""``crosspatch serve``: the explorer page over one model, on this machine by default."""

from __future__ import annotations

import argparse
import sys

from .errors import PROG, CLIError
from .model_options import add_model_options, parse_device, parse_dtype

__all__ = ["add_serve"]


def add_serve(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="a local page to patch, steer and explore a model interactively",
        description="Serve the explorer for MODEL (a zoo name or a checkpoint folder with its tokenizer): type a "
                    "clean and a corrupt prompt, sweep sites and watch the result fill in, click a site to patch "
                    "it, drag a steering strength. Listens on 127.0.0.1 unless --host and --allow-remote say "
                    "otherwise. Needs the serve extra: pip install 'crosspatch[serve]'.",
    )
    p.add_argument("model", metavar="MODEL", help="zoo model name or checkpoint folder")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8765, help="port (default 8765)")
    p.add_argument("--allow-remote", action="store_true",
                   help="allow a --host other than loopback (anyone reaching it can run the model)")
    p.add_argument("--features", action="append", default=[], metavar="DIR",
                   help="an SAE or transcoder folder for the feature picker (repeatable)")
    add_model_options(p)
    p.set_defaults(func=_cmd_serve)


def _cmd_serve(args: argparse.Namespace) -> int:
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise CLIError("serve needs starlette and uvicorn: pip install 'crosspatch[serve]'") from None
    from ..serve.server import is_loopback, load_session, serve
    from ..serve.session import RequestError

    if not 0 < args.port < 65536:
        raise CLIError(f"--port must be in 1..65535, got {args.port}")
    if not is_loopback(args.host) and not args.allow_remote:  # before loading the model
        raise CLIError(f"--host {args.host} is not a loopback address; the server would run the model for anyone "
                       f"who reaches it. Pass --allow-remote to listen there anyway, or keep the default 127.0.0.1")
    try:
        session = load_session(args.model, seed=args.model_seed, device=parse_device(args.device),
                               dtype=parse_dtype(args.dtype), features=args.features)
    except RequestError as exc:
        raise CLIError(str(exc)) from None
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"{PROG}: serving {args.model} on http://{host}:{args.port}/ (Ctrl-C stops)", file=sys.stderr)
    serve(session, args.host, args.port, allow_remote=args.allow_remote)
    return 0
