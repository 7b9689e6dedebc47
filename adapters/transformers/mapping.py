"""Which modules serve each site family of one model: the hand-written table for the families it
lists, else inference (:mod:`.infer`) followed by its proof on the model (:mod:`.proof`).

Looked up once per model object and kept while the model lives.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

from torch import nn

from .architectures import Architecture, architecture_for
from .infer import InferenceError, infer
from .inputs import LAYOUTS, InputLayout

__all__ = ["Mapping", "mapping_for"]


@dataclass(frozen=True)
class Mapping:
    """An Architecture, its receiver-input layout, and where it came from."""

    arch: Architecture | None
    layout: InputLayout | None = None
    inferred: bool = False
    notes: dict[str, str] = field(default_factory=dict)  # family -> why it is not served
    error: str | None = None  # why no Architecture at all


_MAPPINGS: "weakref.WeakKeyDictionary[nn.Module, Mapping]" = weakref.WeakKeyDictionary()


def mapping_for(model: nn.Module) -> Mapping:
    """The table's mapping for ``model.config.model_type``, else the inferred one (or the reason there is none)."""
    found = _MAPPINGS.get(model)
    if found is None:
        arch = architecture_for(model.config)
        if arch is not None:
            found = Mapping(arch, LAYOUTS.get(model.config.model_type))
        else:
            try:
                inferred = infer(model)
            except InferenceError as exc:
                found = Mapping(None, error=str(exc))
            else:
                found = Mapping(inferred.arch, inferred.layout, True, dict(inferred.notes))
        _MAPPINGS[model] = found
    return found
