"""``crosspatch install`` and ``crosspatch uninstall``: pip, in the environment crosspatch runs in.
Both run ``python -m pip`` with the interpreter running crosspatch (``sys.executable``), so a plugin
lands where this crosspatch finds it, whatever ``pip`` is first on ``PATH``; pip's output streams
through unchanged and its exit code is the command's; after a successful run the command prints what
``crosspatch plugins`` now lists, from a fresh interpreter (a new process sees new distributions and
editable installs that this one cannot). Importing this module is cheap (the standard library only:
no torch, no plugin); ``crosspatch.cli.app`` lists :func:`add_install` and :func:`add_uninstall`."""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import re
import shlex
import subprocess
import sys
from typing import Any, Sequence

__all__ = ["add_install", "add_uninstall", "pip_command"]

logger = logging.getLogger(__name__)

PROG = "crosspatch"
_SELF = "crosspatch"


def pip_command(*args: str) -> list[str]:
    """``[sys.executable, "-m", "pip", *args]``: pip of the environment crosspatch runs in."""
    return [sys.executable, "-m", "pip", *args]


def _call(argv: Sequence[str]) -> int:
    """Run ``argv`` with this process's stdin/stdout/stderr, so its output streams; return its exit code."""
    sys.stdout.flush()
    sys.stderr.flush()
    return subprocess.call(list(argv))


def _error(message: str) -> Exception:
    from .errors import CLIError  # here, not at the top: this module imports only the standard library

    return CLIError(message)


def _normalise(name: str) -> str:
    """A distribution name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(spec: str) -> str | None:
    """The distribution a plain requirement (``name``, ``name>=1``, ``name[extra]``) names; None for paths/URLs."""
    match = re.fullmatch(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*([<>=!~;@].*)?", spec)
    return match.group(1) if match else None


def _run_pip_then_list(cmd: list[str]) -> int:
    print(f"{PROG}: running {shlex.join(cmd)}", file=sys.stderr)
    code = _call(cmd)
    if code != 0:
        print(f"{PROG}: error: pip exited with code {code}", file=sys.stderr)
        return code
    print(f"\n{PROG} plugins now:")
    listed = _call([sys.executable, "-m", PROG, "plugins"])
    if listed != 0:
        print(f"{PROG}: warning: listing the plugins failed (exit code {listed}); pip succeeded", file=sys.stderr)
    return 0


# -- crosspatch install ----------------------------------------------------------------------------


def add_install(sub: Any) -> None:
    p = sub.add_parser(
        "install",
        help="install plugins with pip into this environment",
        description=(
            "Install crosspatch plugins (or any package) with the pip of the Python that runs crosspatch "
            "(python -m pip install ...), then list the plugins crosspatch now finds. pip's output and exit "
            "code pass through."
        ),
        epilog="examples: crosspatch install crosspatch-torchvision | crosspatch install -e ./my-plugin",
    )
    p.add_argument(
        "packages", nargs="*", metavar="NAME",
        help="a requirement (crosspatch-torchvision, 'crosspatch-torchvision>=0.1'), a local folder, a wheel or a URL",
    )
    p.add_argument("-U", "--upgrade", action="store_true", help="upgrade the packages to their newest version")
    p.add_argument(
        "-e", "--editable", action="append", default=[], metavar="PATH",
        help="install a local plugin folder in editable mode (repeatable)",
    )
    p.add_argument("--force-reinstall", action="store_true", help="reinstall even if already up to date")
    p.add_argument("--no-cache-dir", action="store_true", help="do not use pip's cache")
    p.add_argument("--pre", action="store_true", help="include pre-release versions")
    p.set_defaults(func=_cmd_install)


def _cmd_install(args: argparse.Namespace) -> int:
    if not args.packages and not args.editable:
        raise _error("name at least one package to install, or a folder with -e (see 'crosspatch install --help')")
    cmd = pip_command("install")
    for flag in ("upgrade", "force_reinstall", "no_cache_dir", "pre"):
        if getattr(args, flag):
            cmd.append("--" + flag.replace("_", "-"))
    for path in args.editable:
        cmd += ["-e", path]
    cmd += args.packages
    return _run_pip_then_list(cmd)


# -- crosspatch uninstall --------------------------------------------------------------------------


def add_uninstall(sub: Any) -> None:
    p = sub.add_parser(
        "uninstall",
        help="uninstall plugins with pip from this environment",
        description=(
            "Uninstall plugin distributions with the pip of the Python that runs crosspatch "
            "(python -m pip uninstall -y ...), then list the plugins crosspatch now finds. A NAME that is a "
            "plugin's name as 'crosspatch plugins' shows it (e.g. torchvision) uninstalls the distribution "
            "that provides it (crosspatch-torchvision), not the library of the same name."
        ),
    )
    p.add_argument("packages", nargs="+", metavar="NAME", help="a plugin name or a distribution name")
    p.set_defaults(func=_cmd_uninstall)


def _plugin_distributions() -> dict[str, str]:
    """Entry-point name of every installed plugin -> the distribution that declares it (no plugin is imported)."""
    out: dict[str, str] = {}
    try:
        eps = importlib.metadata.entry_points(group=PROG)
    except Exception:  # corrupt metadata somewhere: fall back to plain distribution names
        logger.debug("could not list entry points", exc_info=True)
        return out
    for ep in eps:
        dist = getattr(ep, "dist", None)
        try:
            name = dist.metadata["Name"] if dist is not None else None
        except Exception:
            name = None
        if name:
            out.setdefault(ep.name, name)
    return out


def _cmd_uninstall(args: argparse.Namespace) -> int:
    plugins = _plugin_distributions()
    dists: list[str] = []
    for name in args.packages:
        target = name
        dist = plugins.get(name)
        if dist is not None and _normalise(dist) != _normalise(name):
            if _normalise(dist) == _SELF:
                raise _error(
                    f"plugin {name!r} is built into crosspatch and cannot be uninstalled; "
                    f"turn it off with CROSSPATCH_DISABLE_PLUGINS={name}"
                )
            print(f"{PROG}: plugin {name!r} comes from distribution {dist!r}; uninstalling that", file=sys.stderr)
            target = dist
        if _normalise(_requirement_name(target) or "") == _SELF:
            raise _error(
                "refusing to uninstall crosspatch itself from its own command; use 'python -m pip uninstall crosspatch'"
            )
        if target not in dists:
            dists.append(target)
    return _run_pip_then_list(pip_command("uninstall", "-y", *dists))
