"""How the command line reports a problem: :data:`PROG`, the name its messages start with;
:class:`CLIError`, a user-facing error (one line, exit code 2); and :class:`Parser`, the argparse
parser whose usage errors raise a ``CLIError`` instead of printing usage and exiting."""

from __future__ import annotations

import argparse

__all__ = ["PROG", "CLIError", "Parser"]

PROG = "crosspatch"


class CLIError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors raise instead of printing usage and exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise CLIError(f"{message} (see '{self.prog} --help')")
