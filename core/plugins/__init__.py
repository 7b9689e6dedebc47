"""Plugins: the hook specifications and the registry that loads entry points.

``hookspecs`` says what a plugin may register (adapters, zoo models, tasks, interventions);
``registry`` finds the ``crosspatch`` entry points, reports the ones that fail and collects what the
rest register. Every layer above looks things up here instead of importing what provides them, so
this package imports nothing else of crosspatch. The conformance suite for plugin authors is
:mod:`crosspatch.testing`.
"""

from .registry import (
    BUILTIN_DISTRIBUTION, DISABLE_ENV_VAR, ENTRY_POINT_GROUP, KINDS, PLUGINS_ENV_VAR, PREFER_ENV_VAR, PluginInfo,
    PluginLoadWarning, Registry, get_registry, matches, reset_registry,
)

__all__ = [
    "BUILTIN_DISTRIBUTION", "DISABLE_ENV_VAR", "ENTRY_POINT_GROUP", "KINDS", "PLUGINS_ENV_VAR", "PREFER_ENV_VAR",
    "PluginInfo", "PluginLoadWarning", "Registry", "get_registry", "matches", "reset_registry",
]
