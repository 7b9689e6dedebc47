"""The ``crosspatch`` command line, the top of the layers: it may import every package below.

``app`` builds the parser and runs a command; ``install`` is ``crosspatch install`` / ``uninstall``.
"""

from .app import CLIError, main

__all__ = ["CLIError", "main"]
