"""Entry point of the built-in transformers adapter (group ``crosspatch``, name ``transformers``)."""

from crosspatch.plugins.hookspecs import hookimpl

from .adapter import TransformersAdapter


@hookimpl
def register_adapters(register):
    register(TransformersAdapter())


@hookimpl
def register_models(register):
    # Specs only: transformers is imported, and models trained, when one is loaded.
    from .minilm import MINILM
    from .zoo import ZOO_MODELS

    for spec in (*ZOO_MODELS, MINILM):
        register(spec)
