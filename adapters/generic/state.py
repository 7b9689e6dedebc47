"""Per model: the generic catalogs built for it (held weakly) and its recent probes (plain data).

Kept here, keyed weakly by the model, rather than on the adapter: the registered adapter is one
instance for every model, and a wrapped model that is pickled (into a worker) takes its catalog along,
which registers itself again with the unpickled model.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from torch import nn

from .probe import Probe

if TYPE_CHECKING:
    from .catalog import GenericCatalog

__all__ = ["KEPT_PROBES", "ModelState", "state_of", "known"]

#: Probes kept per model, one per input signature (the sizes beyond the batch axis), least recent dropped.
KEPT_PROBES = 8


@dataclass
class ModelState:
    """A model's catalogs and probes. Nothing here refers to the model, so the entry dies with it."""

    catalogs: "weakref.WeakSet[GenericCatalog]" = field(default_factory=weakref.WeakSet)
    probes: "OrderedDict[tuple, Probe]" = field(default_factory=OrderedDict)

    def probe(self, signature: tuple, run: Callable[[], Probe]) -> Probe:
        """The probe of inputs of ``signature``: a kept one, or ``run()``'s (then kept)."""
        if signature not in self.probes:
            self.probes[signature] = run()
            while len(self.probes) > KEPT_PROBES:
                self.probes.popitem(last=False)
        self.probes.move_to_end(signature)
        return self.probes[signature]


_STATES: "weakref.WeakKeyDictionary[nn.Module, ModelState]" = weakref.WeakKeyDictionary()


def state_of(model: nn.Module) -> ModelState:
    """The model's state, created on first use."""
    return _STATES.setdefault(model, ModelState())


def known(model: nn.Module) -> ModelState | None:
    """The model's state if a generic catalog was ever built for it."""
    return _STATES.get(model)
