"""Hook specifications for crosspatch plugins.

A plugin is a module (or any object) with functions decorated by
:data:`hookimpl`.  It is found through the ``crosspatch`` entry-point group::

    # pyproject.toml of the plugin's distribution
    [project.entry-points.crosspatch]
    myplugin = "myplugin.crosspatch_plugin"

or registered at run time with ``crosspatch.plugins.get_registry().register(module, "name")``.

Every hook uses the register-callback style: crosspatch calls the hook with a
``register`` function and the plugin calls it once per item it contributes::

    from crosspatch.hookspecs import hookimpl

    @hookimpl
    def register_adapters(register):
        register(MyAdapter())

An implementation may accept fewer arguments than the specification names
(for example none at all); crosspatch passes only the arguments it asks for.
This lets the specifications grow new arguments without breaking plugins.

Each plugin's implementation is called on its own.  If it raises, crosspatch
warns (:class:`crosspatch.plugins.PluginLoadWarning`), drops whatever that call
had registered and carries on with the other plugins.
"""

from __future__ import annotations

from typing import Any, Callable

import pluggy

__all__ = [
    "PROJECT_NAME",
    "Register",
    "hookimpl",
    "hookspec",
    "register_adapters",
    "register_interventions",
    "register_models",
    "register_tasks",
]

#: Name shared by the hook markers, the plugin manager and the entry-point group.
PROJECT_NAME = "crosspatch"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)

#: The callback handed to every ``register_*`` hook: call it once per item.
Register = Callable[[Any], None]


@hookspec
def register_adapters(register: Register) -> None:
    """Register model adapters.

    Call ``register(adapter)`` once per adapter.  An adapter is any object with
    a ``name`` attribute (a non-empty ``str``) that is unique across plugins;
    it teaches the engine how to find intervention sites in one family of
    models (for example ``"transformers"``).
    """


@hookspec
def register_models(register: Register) -> None:
    """Register models for the model zoo.

    Call ``register(spec)`` once per model.  ``spec`` is any object with a
    ``name`` attribute (a non-empty ``str``) that is unique across plugins.
    Loading the weights should be deferred until the spec is used, so that
    listing the zoo stays cheap.
    """


@hookspec
def register_tasks(register: Register) -> None:
    """Register counterfactual tasks (datasets of base/source pairs).

    Call ``register(spec)`` once per task.  ``spec`` is any object with a
    ``name`` attribute (a non-empty ``str``) that is unique across plugins.
    """


@hookspec
def register_interventions(register: Register) -> None:
    """Register intervention classes.

    Call ``register(cls)`` once per class.  ``cls`` must be a class with a
    ``kind`` attribute (a non-empty ``str``): the name the intervention is
    serialised under, unique across plugins.
    """
