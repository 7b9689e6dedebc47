"""Module paths from before the layered packages, kept working for code that imports them.

``import crosspatch.catalog`` gives the module ``crosspatch.sites.catalog`` itself (one module object,
so a patch through either name is seen by both). A finder at the front of ``sys.meta_path`` answers
the names in :data:`MOVED` and no others; it must come first, or the path finder would load a second
copy of ``crosspatch.tasks.ioi`` from the moved package's folder.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from types import ModuleType

#: old path -> the module that holds it now. Paths that are packages today (``crosspatch.sites``,
#: ``crosspatch.engine``, ``crosspatch.zoo`` …) re-export their old names and need no entry.
MOVED: dict[str, str] = {
    "crosspatch.catalog": "crosspatch.sites.catalog",
    "crosspatch.selection": "crosspatch.sites.selection",
    "crosspatch.adapter": "crosspatch.engine.adapter",
    "crosspatch.reach": "crosspatch.engine.reach",
    "crosspatch.cache": "crosspatch.engine.cache",
    "crosspatch.interventions": "crosspatch.engine.interventions",
    "crosspatch.resume": "crosspatch.engine.resume",
    "crosspatch.offload": "crosspatch.engine.offload",
    "crosspatch.output_positions": "crosspatch.engine.output_positions",
    "crosspatch.model": "crosspatch.engine.model",
    "crosspatch.metrics": "crosspatch.results.metrics",
    "crosspatch.report": "crosspatch.results.report",
    "crosspatch.hookspecs": "crosspatch.plugins.hookspecs",
    "crosspatch.tasks": "crosspatch.zoo.tasks",
    "crosspatch.tasks.base": "crosspatch.zoo.tasks.base",
    "crosspatch.tasks.greater_than": "crosspatch.zoo.tasks.greater_than",
    "crosspatch.tasks.ioi": "crosspatch.zoo.tasks.ioi",
    "crosspatch.tasks.plugin": "crosspatch.zoo.tasks.plugin",
    "crosspatch.tasks.shapes": "crosspatch.zoo.tasks.shapes",
    "crosspatch.toys": "crosspatch.zoo.toys",
    "crosspatch.ground_truth": "crosspatch.zoo.ground_truth",
    "crosspatch.sae": "crosspatch.trainable.sae",
    "crosspatch.methods.das": "crosspatch.trainable.das",
    "crosspatch.methods.masks": "crosspatch.trainable.masks",
    "crosspatch.methods.erasure": "crosspatch.trainable.erasure",
    "crosspatch.executors": "crosspatch.scale.executors",
    "crosspatch.sharding": "crosspatch.scale.sharding",
    "crosspatch.shard_store": "crosspatch.scale.shard_store",
    "crosspatch.ray_executor": "crosspatch.scale.ray_executor",
    "crosspatch.model_source": "crosspatch.scale.model_source",
    "crosspatch.cli_install": "crosspatch.cli.install",
}


class _MovedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers the old paths in :data:`MOVED` with the modules that hold them now."""

    def find_spec(self, fullname: str, path: object = None, target: object = None):
        if fullname not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, self, is_package=fullname == "crosspatch.tasks")

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        module = importlib.import_module(MOVED[spec.name])
        spec.loader_state = module.__spec__  # its own spec, for exec_module to put back
        return module

    def exec_module(self, module: ModuleType) -> None:
        """The module ran when it was imported under its own name. The import system has just set its
        ``__spec__`` to the old path's; give it back its own, or its relative imports would resolve
        against the old parent (and warn that ``__package__ != __spec__.parent``)."""
        module.__spec__ = module.__spec__.loader_state


def install() -> None:
    """Add the finder once (importing crosspatch twice, or reloading it, adds no second one)."""
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _MovedFinder())
