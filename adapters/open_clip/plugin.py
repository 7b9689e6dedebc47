"""Entry point of the built-in open_clip adapter (group ``crosspatch``, name ``open_clip``)."""

from crosspatch.plugins.hookspecs import hookimpl

from .adapter import OpenClipAdapter


@hookimpl
def register_adapters(register):
    register(OpenClipAdapter())


@hookimpl
def register_models(register):
    from .zoo import ZOO_MODELS

    for spec in ZOO_MODELS:
        register(spec)
