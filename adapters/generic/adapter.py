"""The generic adapter: sites for the modules of any ``nn.Module`` no other adapter serves.

``cp.wrap(model)`` picks it when no adapter written for the model matches (it is a ``fallback``);
``cp.wrap(model, adapter="generic")`` picks it for any model. Its sites are read from the model itself:
``module.<path>`` (a module's output), ``module_in.<path>`` (its first positional input), fields of
tuple or dict outputs, and stacks of numbered children as layers (:mod:`.naming`; docs/generic.md).

Sizes exist only once inputs do, so the catalog ``wrap`` builds is empty and :meth:`GenericAdapter.prepare`
fills it: the first inputs of each size run one probe forward (:mod:`.probe`) on three of their rows.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from crosspatch.engine.adapter import Adapter, AdapterError, Inputs
from crosspatch.sites.catalog import Catalog

from .axes import sequence_length
from .catalog import GenericCatalog
from .families import build_families
from .fields import primary_tensor
from .inputs import as_inputs, call_arguments
from .naming import site_specs
from .probe import input_signature, run_probe
from .state import known

__all__ = ["GenericAdapter"]


class GenericAdapter(Adapter):
    """Serves any ``nn.Module`` by its module tree; see the module docstring and docs/generic.md."""

    name = "generic"
    fallback = True

    def matches(self, model: nn.Module) -> bool:
        return isinstance(model, nn.Module)

    def catalog(self, model: nn.Module) -> Catalog:
        return GenericCatalog(model)

    def prepare(self, model: nn.Module, inputs: Any) -> Inputs:
        prepared = as_inputs(model, inputs)
        self._read_sites(model, prepared)
        return prepared

    def forward(self, model: nn.Module, inputs: Inputs) -> Any:
        args, kwargs = call_arguments(inputs)
        return model(*args, **kwargs)

    def output(self, raw: Any) -> torch.Tensor:
        tensor = primary_tensor(raw)
        if tensor is None:
            raise AdapterError(
                f"the model returned a {type(raw).__name__} without a tensor field of one or more axes; the generic "
                f"adapter takes the first such field as the output"
            )
        return tensor

    def sizes(self, inputs: Inputs) -> dict[str, int]:
        seq = sequence_length(inputs)
        return {} if seq is None else {"pos": seq}

    def _read_sites(self, model: nn.Module, inputs: Inputs) -> None:
        """Refill the model's catalogs that were read from inputs of other sizes (or from none yet)."""
        state = known(model)
        if state is None:
            return
        signature = input_signature(model, inputs)
        stale = [c for c in state.catalogs if c.signature != signature]
        if not stale:
            return
        probe = state.probe(signature, lambda: run_probe(model, inputs, self.forward))
        specs, missing = site_specs(probe)
        families = build_families(model, specs, probe.hints)
        for catalog in stale:
            catalog.show(signature, families, missing)
