"""Entry point of the built-in generic adapter (group ``crosspatch``, name ``generic``).

The adapter is a fallback: ``wrap`` asks it only after every other adapter declined a model.
"""

from crosspatch.plugins.hookspecs import hookimpl

from .adapter import GenericAdapter


@hookimpl
def register_adapters(register):
    register(GenericAdapter())
