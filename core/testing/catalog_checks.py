"""The checks of setup and of what the catalog promises: setup, catalog, reach and shapes.

Setup finds the adapter, builds the catalog, prepares the inputs and runs a plain forward; the others
hold the catalog to what a forward does: well-formed families, every site reached (all of them captured
in one run when possible, which later checks reuse), and captures shaped ``[batch, *axes]``.
"""

from __future__ import annotations

from typing import Mapping

import torch

from ..engine.adapter import batch_size
from ..engine.cache import Cache
from ..sites.catalog import Axis, Catalog, SiteFamily
from ..sites.site import Site, site_key
from .runner import Fatal, SuiteBase, family_keys, fmt_exc
from .tensors import model_state


class CatalogChecks(SuiteBase):
    """The checks setup, catalog, reach and shapes."""

    def check_setup(self) -> list[str]:
        problems = []
        if self.adapter_arg is None or isinstance(self.adapter_arg, str):
            from ..engine.model import find_adapter

            try:
                self.adapter = find_adapter(self.model, self.adapter_arg)
            except Exception as err:
                raise Fatal(f"finding the adapter raised {fmt_exc(err)}") from None
        else:
            self.adapter = self.adapter_arg
        adapter = self.adapter
        if not isinstance(getattr(adapter, "name", None), str) or not adapter.name:
            problems.append(f"the adapter needs a non-empty str .name, got {getattr(adapter, 'name', None)!r}")
        try:
            if not adapter.matches(self.model):
                problems.append(
                    f"adapter.matches(model) is False for {type(self.model).__name__}: wrap() would not pick it"
                )
        except Exception as err:
            problems.append(f"adapter.matches(model) raised {fmt_exc(err)}")
        if self.model.training:
            raise Fatal("the model is in training mode (dropout, batch-norm statistics); call model.eval() first")
        self.state0 = model_state(self.model)
        try:
            catalog = adapter.catalog(self.model)
        except Exception as err:
            raise Fatal(f"adapter.catalog(model) raised {fmt_exc(err)}") from None
        if not isinstance(catalog, Catalog):
            raise Fatal(f"adapter.catalog(model) returned {type(catalog).__name__}, not a crosspatch Catalog")
        try:
            prepared = adapter.prepare(self.model, self.inputs)
        except Exception as err:
            raise Fatal(f"adapter.prepare(model, inputs) raised {fmt_exc(err)}") from None
        if not isinstance(prepared, Mapping) or not all(isinstance(k, str) for k in prepared):
            raise Fatal(f"adapter.prepare() must return a dict of tensors by name, got {type(prepared).__name__}")
        try:
            self.n = batch_size(prepared)
        except Exception as err:
            raise Fatal(f"the prepared inputs have no batch size: {fmt_exc(err)}") from None
        self.prepared = dict(prepared)
        self.catalog = catalog
        try:
            run = self._execute("a plain forward", self.prepared)
        except Exception as err:
            self.catalog = None
            raise Fatal(f"a plain forward (adapter.forward / adapter.output) raised {fmt_exc(err)}") from None
        if not isinstance(run.output, torch.Tensor):
            self.catalog = None
            raise Fatal(f"adapter.output() must return a tensor, got {type(run.output).__name__}")
        self.plain = run.output
        return problems

    def check_catalog(self) -> list[str]:
        problems = []
        if len(self.catalog) == 0:
            problems.append("the catalog lists no site family")
        for fam in self.catalog:
            if not isinstance(fam, SiteFamily):
                problems.append(f"{fam!r} is a {type(fam).__name__}, not a SiteFamily")
                continue
            what = f"family {fam.name!r}"
            try:
                for layer in (None,) if fam.layers is None else (0,):
                    parsed = Site.parse(site_key(fam.name, layer))
                    if parsed.family != fam.name or parsed.layer != layer:
                        raise ValueError(f"parses as family {parsed.family!r}, layer {parsed.layer!r}")
            except Exception as err:
                problems.append(self.about(fam.name, f"{what}: its name does not round-trip through the site grammar ({fmt_exc(err)})"))
            if fam.layers is not None and (not isinstance(fam.layers, int) or isinstance(fam.layers, bool)
                                           or fam.layers < 1):
                problems.append(self.about(fam.name, f"{what}: layers must be None or a positive int, got {fam.layers!r}"))
            if not isinstance(fam.axes, tuple) or not all(isinstance(a, Axis) for a in fam.axes):
                problems.append(self.about(fam.name, f"{what}: axes must be a tuple of Axis, got {fam.axes!r}"))
                continue
            names = [a.name for a in fam.axes]
            if len(set(names)) != len(names):
                problems.append(self.about(fam.name, f"{what}: axis names repeat: {names}"))
            if "batch" in names:
                problems.append(self.about(fam.name, f"{what}: 'batch' is the engine's name for the leading axis; do not declare it"))
            for a in fam.axes:
                if not isinstance(a.name, str) or not a.name.isidentifier():
                    problems.append(self.about(fam.name, f"{what}: axis name {a.name!r} is not an identifier"))
                if a.size is not None and (not isinstance(a.size, int) or isinstance(a.size, bool) or a.size < 1):
                    problems.append(self.about(fam.name, f"{what}: axis {a.name!r} has size {a.size!r}; use a positive int or None"))
            if not callable(getattr(fam.reach, "install", None)):
                problems.append(self.about(fam.name, f"{what}: its reach {type(fam.reach).__name__} has no install(layer, callback)"))
        return problems

    def check_reach(self) -> list[str]:
        problems = []
        keys = [k for fam in self.catalog for k in family_keys(fam)]
        try:
            run = self._execute("a run capturing every site", self.prepared, capture=keys)
        except Exception as err:
            together = fmt_exc(err)
        else:
            self.cache, self.out_all, self.families = run.cache, run.output, list(self.catalog)
            missing = [k for k in keys if k not in run.cache]
            return [self.about(k, f"{k}: was reached but nothing was captured") for k in missing]
        # Find out which families fail on their own.
        tensors, axes = {}, {}
        for fam in self.catalog:
            try:
                run = self._execute(f"a run capturing {fam.name}", self.prepared, capture=family_keys(fam))
            except Exception as err:
                problems.append(self.about(fam.name, f"{fam.name}: {fmt_exc(err)}"))
                continue
            self.families.append(fam)
            for key in run.cache:
                tensors[key], axes[key] = run.cache[key], run.cache.axes[key]
        if not problems:
            problems.append(f"every family can be captured alone, but capturing all at once raised {together}")
        self.cache = Cache(tensors, axes)
        return problems

    def check_shapes(self) -> list[str]:
        self._need_cache()
        problems = []
        try:
            sizes = dict(self.adapter.sizes(self.prepared) or {})
        except Exception as err:
            sizes = {}
            problems.append(f"adapter.sizes(inputs) raised {fmt_exc(err)}")
        for fam in self.families:
            for key in family_keys(fam):
                if key not in self.cache:
                    continue
                value = self.cache[key]
                if not isinstance(value, torch.Tensor):
                    problems.append(self.about(key, f"{key}: the reach passed a {type(value).__name__} to the callback, not a tensor"))
                    continue
                expected = [self.n] + [a.size or sizes.get(a.name) for a in fam.axes]
                declared = ", ".join([f"batch={self.n}"] + [
                    f"{a.name}={a.size or sizes.get(a.name) or '?'}" for a in fam.axes
                ])
                if value.ndim != len(expected):
                    problems.append(self.about(key,
                        f"{key}: captured shape {tuple(value.shape)} has {value.ndim} axes; the catalog "
                        f"declares {len(expected)}: [{declared}]"
                    ))
                    continue
                wrong = [
                    f"{name} is {got}, not {want}"
                    for name, got, want in zip(["batch", *fam.axis_names], value.shape, expected)
                    if want is not None and got != want
                ]
                if wrong:
                    problems.append(self.about(key,
                        f"{key}: captured shape {tuple(value.shape)} does not match the catalog's "
                        f"[{declared}]: {'; '.join(wrong)}"
                    ))
        return problems
