"""The plugin module the entry point names: crosspatch imports it and calls its hook implementations.

Keep it cheap to import: crosspatch loads every plugin whenever it needs the registry.
"""

from crosspatch.plugins.hookspecs import hookimpl

from .adapter import MLPAdapter


@hookimpl
def register_adapters(register):
    register(MLPAdapter())
