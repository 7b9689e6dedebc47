"""``python -m crosspatch``: same as the ``crosspatch`` command."""

from .cli.app import main

if __name__ == "__main__":
    raise SystemExit(main())
