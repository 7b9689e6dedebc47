"""The suite's runner: the list of checks (:data:`CHECKS`), running them in order into a report, and the
engine run every check goes through.

:class:`SuiteBase` holds what the checks find and share (the adapter, catalog, prepared inputs, the
plain output, one cache of every reached site), turns each check's outcome (its problems, a
:class:`Skip`, a :class:`Fatal`, a crash) into a :class:`CheckResult`, and runs the engine with every
hook dict compared and restored. The checks are mixins on it, one module per group, put together in
:mod:`crosspatch.testing.check`.
"""

from __future__ import annotations

import logging
from typing import Iterable, Sequence

import torch
from torch import nn

from ..engine.adapter import Adapter, Inputs
from ..engine.cache import Cache
from ..engine.forward import Bound, Run, execute
from ..sites.catalog import Catalog, SiteFamily
from ..sites.site import site_key
from .hooks import restore_hooks, snapshot_hooks
from .report import DEAD_END, FAILED, FAILURE, PASSED, SKIPPED, CheckResult, ConformanceReport, Problem

log = logging.getLogger(__name__)

#: Every check, in the order the report lists them, with what it asserts.
CHECKS: dict[str, str] = {
    "setup": "the adapter matches the model (in eval mode), builds a catalog, prepares the inputs and runs a forward",
    "catalog": "the catalog is well formed: site-parsable family names, unique axis names, positive sizes and "
    "layer counts, reaches with install()",
    "reach": "every site (family and layer) is reached in a forward, all of them captured in one run",
    "shapes": "every captured activation is [batch, *axes] with the catalog's sizes (and adapter.sizes())",
    "passive": "capturing every site leaves the output unchanged",
    "hand_hook": "captures through ModuleOutput / ModuleInput reaches equal a raw torch hook on the same module",
    "self_patch": "every writable family accepts a Patch, and patching it with its own activation changes "
    "nothing, exactly",
    "writes": "a write at every writable site reaches the output, and only in the rows it was bound to",
    "batched": "a batched run equals the per-example runs (captures and output)",
    "dtype": "in float64 the output and every capture are float64",
    "cuda": "on CUDA the prepared inputs, the output and every capture are on the GPU",
    "hooks": "every run, also one that raises, leaves each module's hooks as it found them (yours included)",
    "state": "the model's parameters, buffers, mode and plain output are unchanged after the suite",
}


class Skip(Exception):
    """Raised by a check that cannot run; the message says why."""


class Fatal(Exception):
    """Raised by setup when nothing else can run."""


def fmt_exc(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def family_layers(fam: SiteFamily) -> list[int | None]:
    return [None] if fam.layers is None else list(range(fam.layers))


def family_keys(fam: SiteFamily) -> list[str]:
    return [site_key(fam.name, layer) for layer in family_layers(fam)]


class SuiteBase:
    """The state the checks share and the machinery that runs them; each ``check_<name>`` is a mixin's."""

    def __init__(self, model, inputs, adapter, atol, skip, cuda):
        self.model = model
        self.inputs = inputs
        self.adapter_arg = adapter
        self.adapter: Adapter | None = None
        self.atol = atol
        self.skip = set(skip)
        unknown = {s.split(":", 1)[0] for s in self.skip} - set(CHECKS)
        if unknown:
            raise ValueError(f"skip names unknown checks {sorted(unknown)}; checks: {', '.join(CHECKS)}")
        self.cuda = cuda
        self.results: dict[str, CheckResult] = {}
        self.hook_problems: dict[str, list[str]] = {}  # problem -> labels of the runs that showed it
        # filled by the checks
        self.catalog: Catalog | None = None
        self.prepared: Inputs | None = None
        self.n = 0
        self.plain: torch.Tensor | None = None
        self.families: list[SiteFamily] = []  # families reached in a forward
        self.cache: Cache | None = None  # every reached key, from one run when possible
        self.out_all: torch.Tensor | None = None  # output of the run capturing every key (None if impossible)
        self.state0: dict[str, torch.Tensor] = {}
        self.training0 = model.training

    def run(self) -> ConformanceReport:
        fatal = False
        for name in CHECKS:  # the order matters: later checks use what earlier ones found
            self.results[name] = self._one(name, getattr(self, f"check_{name}"), fatal)
            if name == "setup" and self.plain is None:
                fatal = True
        adapter_name = getattr(self.adapter, "name", None) or repr(self.adapter_arg)
        return ConformanceReport(adapter_name, type(self.model).__name__, self.results)

    def _one(self, name, check, fatal) -> CheckResult:
        if name in self.skip and name != "setup":
            return CheckResult(name, SKIPPED, ["skipped on request"])
        if fatal:
            return CheckResult(name, SKIPPED, ["setup failed; nothing else can run"])
        try:
            messages = check()
        except Skip as why:
            result = CheckResult(name, SKIPPED, [str(why)])
        except Fatal as why:
            result = CheckResult(name, FAILED, [str(why)])
        except Exception as err:  # a check that crashes is a failed check, with the error
            log.debug("conformance check %s raised", name, exc_info=True)
            result = CheckResult(name, FAILED, [f"raised {fmt_exc(err)}"])
        else:
            result = CheckResult(name, FAILED if messages else PASSED, list(dict.fromkeys(messages)))
        log.debug("conformance check %s: %s %s", name, result.status, result.messages)
        return result

    def about(self, site: str, message: str, kind: str = FAILURE) -> Problem:
        """``message`` as a :class:`Problem` of the family named by ``site`` (a family or one of its keys)."""
        families = {key: fam.name for fam in (self.catalog or []) for key in (fam.name, *family_keys(fam))}
        return Problem(message, families.get(site), kind)

    def _skipped(self, check: str, family: str) -> bool:
        return f"{check}:{family}" in self.skip

    def _execute(self, label: str, prepared: Inputs, bounds: Sequence[Bound] = (), capture: Iterable[str] = (),
                 model: nn.Module | None = None, catalog: Catalog | None = None) -> Run:
        """The engine's run, with every hook dict compared (and restored) before and after."""
        model = self.model if model is None else model
        snap = snapshot_hooks(model)
        try:
            return execute(model, self.adapter, catalog or self.catalog, prepared, list(bounds), list(capture))
        finally:
            for problem in restore_hooks(snap):
                self.hook_problems.setdefault(problem, []).append(label)

    def _need_cache(self) -> None:
        if not self.cache:
            raise Skip("needs captured sites (see reach)")
