"""Entry point of the built-in VLM adapter (group ``crosspatch``, name ``vlm``)."""

from crosspatch.plugins.hookspecs import hookimpl

from .adapter import VLMAdapter


@hookimpl
def register_adapters(register):
    register(VLMAdapter())
