"""Entry point of the tracr adapter (group ``crosspatch``, name ``tracr``)."""

from crosspatch.plugins.hookspecs import hookimpl

from .adapter import TracrAdapter


@hookimpl
def register_adapters(register):
    register(TracrAdapter())
