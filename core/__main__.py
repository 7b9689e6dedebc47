"""``python -m crosspatch``: same as the ``crosspatch`` command."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
