"""Entry point of the built-in VAE adapter (group ``crosspatch``, name ``vae``).

Registering imports neither diffusers nor any weights: the adapter recognises an ``AutoencoderKL``
only if diffusers is already imported, and zoo models build or load when they are asked for.
"""

from crosspatch.plugins.hookspecs import hookimpl

from .adapter import VAEAdapter
from .zoo import ZOO_MODELS


@hookimpl
def register_adapters(register):
    register(VAEAdapter())


@hookimpl
def register_models(register):
    for spec in ZOO_MODELS:
        register(spec)
