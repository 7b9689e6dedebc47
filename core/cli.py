"""The ``crosspatch`` command line.

Each subcommand is a pair of functions: ``_add_<name>(subparsers)`` builds its
parser and sets ``func`` to ``_cmd_<name>(args) -> int``.  To add one, write
the pair and list the adder in :data:`_SUBCOMMANDS`.

Errors are reported as a single ``crosspatch: error: ...`` line on stderr with
exit code 2; ``-v`` adds debug logging (with tracebacks).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from typing import Any, Callable, Sequence

from . import plugins as _plugins

__all__ = ["CLIError", "main"]

logger = logging.getLogger(__name__)

PROG = "crosspatch"
EXIT_ERROR = 2


class CLIError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


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


# -- parser and entry point -------------------------------------------------------

#: Adders for every subcommand, in the order ``--help`` lists them.
_SUBCOMMANDS: list[Callable[[Any], None]] = [_add_plugins]


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
            msg = " ".join(str(exc).split())
            print(f"{PROG}: error: {type(exc).__name__}: {msg}", file=sys.stderr)
            return EXIT_ERROR
