"""The ``crosspatch`` command line: the parser, assembled from one module per command, and
:func:`main`, which runs a command and turns what goes wrong into one ``crosspatch: error: ...``
line on stderr with exit code 2 (``-v`` adds debug logging, with tracebacks) and every warning into
one ``crosspatch: <category>: ...`` line. A command is a module ``cmd_<name>`` (``install`` for
install and uninstall) whose ``add_<name>(subparsers)`` builds its parser and sets ``func`` to a
function ``(args) -> exit code``; to add one, write the module and list its adder in
:data:`_SUBCOMMANDS`."""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from typing import Any, Callable, Sequence

from .cmd_extract import add_extract
from .cmd_localize import add_localize
from .cmd_patch import add_patch
from .cmd_plugins import add_plugins
from .cmd_run import add_run
from .cmd_serve import add_serve
from .cmd_sites import add_sites
from .cmd_verify import add_verify
from .cmd_zoo import add_zoo
from .errors import PROG, CLIError, Parser
from .install import add_install, add_uninstall

__all__ = ["CLIError", "main"]

logger = logging.getLogger(__name__)

EXIT_ERROR = 2


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("crosspatch")
    except Exception:
        return "unknown"


# -- parser and entry point -------------------------------------------------------

#: Adders for every subcommand, in the order ``--help`` lists them.
_SUBCOMMANDS: list[Callable[[Any], None]] = [
    add_plugins, add_zoo, add_sites, add_verify, add_patch, add_localize, add_run, add_serve, add_extract, add_install,
    add_uninstall,
]


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog=PROG,
        description="Causal interventions inside neural networks.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {_version()}")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="debug logging to stderr (includes tracebacks)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
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
    ("crosspatch.engine.text", "TokenizationError"),
    ("crosspatch.results.formats", "FormatError"),
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
            try:
                args = parser.parse_args(argv)
            except SystemExit as exc:  # --help / --version
                code = exc.code
                return code if isinstance(code, int) else (0 if code is None else EXIT_ERROR)
            if args.verbose:
                logging.basicConfig(level=logging.DEBUG, format="%(name)s: %(message)s")
            if args.command is None:
                parser.print_help()
                return 0
            return int(args.func(args) or 0)
        except SystemExit as exc:  # from code the command ran (a plugin, a library): never a silent exit
            logger.debug("SystemExit during the command", exc_info=True)
            print(
                f"{PROG}: error: code run by '{args.command}' raised SystemExit({exc.code!r}) and ended it "
                f"early (-v shows where)",
                file=sys.stderr,
            )
            return EXIT_ERROR
        except KeyboardInterrupt as exc:
            notes = " ".join(getattr(exc, "__notes__", ()))  # e.g. which plugin was loading
            print(f"{PROG}: interrupted" + (f": {notes}" if notes else ""), file=sys.stderr)
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
