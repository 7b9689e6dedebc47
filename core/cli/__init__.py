"""The ``crosspatch`` command line, the top of the layers (it may import every package below): ``app``
assembles the parser and runs a command; each command is one module, ``cmd_plugins``, ``cmd_zoo``,
``cmd_sites``, ``cmd_patch`` and ``install`` (``install`` / ``uninstall``, a name kept because the old
path ``crosspatch.cli_install`` points at it); ``model_options`` and ``tables`` hold what several
commands share; ``errors`` holds ``CLIError`` and the parser that raises it."""

from .app import main
from .errors import CLIError

__all__ = ["CLIError", "main"]
