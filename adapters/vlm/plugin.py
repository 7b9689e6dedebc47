"""Entry point of the built-in VLM adapter (group ``crosspatch``, name ``vlm``)."""

from crosspatch.plugins.hookspecs import hookimpl

from .adapter import VLMAdapter


@hookimpl
def register_adapters(register):
    register(VLMAdapter())


@hookimpl
def register_models(register):
    # Specs only: transformers is imported, and the model trained, when it is loaded.
    from .zoo import ZOO_MODELS

    for spec in ZOO_MODELS:
        register(spec)
