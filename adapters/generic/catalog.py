"""The generic adapter's catalog: empty until the adapter sees inputs, then the sites a probe on them showed."""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from torch import nn

from crosspatch.sites.catalog import Catalog, SiteFamily
from crosspatch.sites.site import SiteError

from .state import state_of

__all__ = ["GenericCatalog"]


class GenericCatalog(Catalog):
    """A :class:`Catalog` the generic adapter fills from a probe forward on the inputs it prepares.

    ``wrap`` builds it before any input exists, so it starts empty; each ``prepare`` of inputs of new
    sizes (beyond the batch axis) refills it, in place, with the sites and sizes a forward on them shows.
    Asking for a family that a shared, unrun or doubly named module would have had raises the reason.
    """

    def __init__(self, model: nn.Module):
        super().__init__((), type(model).__name__)
        self.model = model
        self.signature: tuple | None = None
        self.missing: dict[str, SiteError] = {}
        state_of(model).catalogs.add(self)

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickled (with its model, in a worker): register again, so new inputs refill it."""
        self.__dict__.update(state)
        state_of(self.model).catalogs.add(self)

    def show(self, signature: tuple, families: Iterable[SiteFamily], missing: Mapping[str, SiteError]) -> None:
        """Replace the families with those read from inputs of ``signature``."""
        self.families.clear()
        for family in families:
            self.families[family.name] = family
        self.missing = dict(missing)
        self.signature = signature

    def family(self, name: str) -> SiteFamily:
        if name not in self.families:
            if self.signature is None:
                raise SiteError(
                    f"{self.model_name} has no sites yet: the generic adapter reads them from a forward on the "
                    f"first inputs it sees; run or capture once, or call prepare(example) on the wrapped model"
                )
            if name in self.missing:
                error = self.missing[name]
                raise type(error)(*error.args)
        return super().family(name)

    def __repr__(self) -> str:
        if self.signature is None:
            return (f"Catalog of {self.model_name} (no sites yet: the generic adapter reads them from the first "
                    f"inputs; run, capture or prepare(example) first)")
        return super().__repr__()
