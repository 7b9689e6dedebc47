"""Entry point of the built-in transformers adapter (group ``crosspatch``, name ``transformers``)."""

from crosspatch.hookspecs import hookimpl

from .adapter import TransformersAdapter


@hookimpl
def register_adapters(register):
    register(TransformersAdapter())
