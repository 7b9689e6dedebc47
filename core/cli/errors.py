"""The command line's user-facing error."""


class CLIError(Exception):
    """A user-facing error: printed as one line, exit code 2."""
