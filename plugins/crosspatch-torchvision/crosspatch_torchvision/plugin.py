"""Entry point of the plugin (group ``crosspatch``, name ``torchvision``).

Importing this module must stay cheap: crosspatch imports it whenever it loads plugins (even for
``crosspatch plugins``), so it imports the adapter class and nothing of torchvision.
"""

from crosspatch.hookspecs import hookimpl

from .adapter import TorchvisionAdapter


@hookimpl
def register_adapters(register):
    register(TorchvisionAdapter())
