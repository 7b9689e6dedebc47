"""A conformance suite for adapters: run it against your adapter before you publish a plugin.

Three ways to use it::

    from crosspatch.testing import check_adapter, assert_conforms, AdapterConformance

    report = check_adapter(model.eval(), inputs)          # a ConformanceReport; report.failures lists problems
    assert_conforms(model.eval(), inputs, MyAdapter())    # raises AssertionError naming every failed check

    class TestMyAdapter(AdapterConformance):               # in a test file: one pytest test per check
        def make_model(self):
            return MyNet().eval()

        def make_inputs(self):
            return torch.randn(3, 8)

The checks (:data:`CHECKS`) use only the adapter contract and the engine, so they hold for every
architecture: the catalog matches the shapes a forward produces, every site is reachable, captures
through the built-in reaches equal a raw torch hook, self-patching changes nothing (exactly), writes
reach the output and only their rows, hooks are removed (also after a run that raises), dtype and
device follow the model, and a batched run equals the per-example runs.

Use small models: the suite runs a few forwards per site family and copies the model twice
(float64 and, when CUDA is available, on the GPU). The model must be in eval mode.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable, Mapping, Sequence

import torch
from torch import nn

from ..engine.adapter import Adapter, Inputs, batch_size, repeat_rows
from ..engine.cache import Cache
from ..sites.catalog import Axis, Catalog, SiteFamily
from ..engine.forward import Bound, Run, execute
from ..engine.interventions import Intervention, Patch
from ..engine.reach import ModuleInput, ModuleOutput, submodule
from ..sites.site import Site, site_key

__all__ = [
    "CHECKS",
    "AdapterConformance",
    "CheckResult",
    "ConformanceReport",
    "assert_conforms",
    "check_adapter",
]

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

#: Relative tolerance used with ``atol`` wherever two computations need not be bit-identical.
RTOL = 1e-5

_PASSED, _FAILED, _SKIPPED = "passed", "failed", "skipped"


# -- the report ------------------------------------------------------------------------------------


@dataclass
class CheckResult:
    """The outcome of one check: ``passed``, ``failed`` (``messages`` say why) or ``skipped`` (and why)."""

    name: str
    status: str
    messages: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.status == _PASSED

    @property
    def failed(self) -> bool:
        return self.status == _FAILED

    @property
    def skipped(self) -> bool:
        return self.status == _SKIPPED


@dataclass
class ConformanceReport:
    """What :func:`check_adapter` found, one :class:`CheckResult` per check in :data:`CHECKS`."""

    adapter: str
    model: str
    results: dict[str, CheckResult]

    def __getitem__(self, name: str) -> CheckResult:
        return self.results[name]

    @property
    def ok(self) -> bool:
        """True when no check failed (skipped checks do not count against it)."""
        return not any(r.failed for r in self.results.values())

    @property
    def failures(self) -> list[str]:
        """One line per problem, each starting with the name of its check (``"shapes: ..."``)."""
        return [f"{r.name}: {m}" for r in self.results.values() if r.failed for m in r.messages]

    @property
    def skipped(self) -> list[str]:
        """One line per skipped check with the reason (``"cuda: CUDA is not available ..."``)."""
        return [f"{r.name}: {'; '.join(r.messages)}" for r in self.results.values() if r.skipped]

    @property
    def passed(self) -> list[str]:
        return [r.name for r in self.results.values() if r.passed]

    def __str__(self) -> str:
        lines = [f"conformance of adapter {self.adapter!r} on {self.model}: " + ("ok" if self.ok else "FAILED")]
        for r in self.results.values():
            lines.append(f"  {r.status.upper():8} {r.name}")
            lines.extend(f"           - {m}" for m in r.messages)
        return "\n".join(lines)


# -- entry points ----------------------------------------------------------------------------------


def check_adapter(
    model: nn.Module,
    inputs: Any,
    adapter: "Adapter | str | None" = None,
    *,
    atol: float = 1e-5,
    skip: Iterable[str] = (),
    cuda: bool | None = None,
) -> ConformanceReport:
    """Run every conformance check of ``adapter`` on ``model`` and ``inputs``; never raises for a failed check.

    ``model`` must be in eval mode; ``inputs`` is what a user passes to ``run`` (at least two examples,
    or the batched check is skipped). ``adapter`` is an instance, a registered adapter's name, or None
    for the one the plugin registry picks. ``atol`` (with a relative tolerance of :data:`RTOL`) bounds
    differences between computations that need not be bit-identical; self-patching must be exact.
    ``skip`` names checks to leave out (``"dtype"``), or one family of a per-family check
    (``"writes:latent.logvar"``, for a site whose writes cannot reach the output). ``cuda`` forces
    the CUDA check on or off (default: on when CUDA is available, else skipped, saying so).
    """
    return _Suite(model, inputs, adapter, atol, skip, cuda).run()


def assert_conforms(
    model: nn.Module,
    inputs: Any,
    adapter: "Adapter | str | None" = None,
    **options: Any,
) -> ConformanceReport:
    """:func:`check_adapter`, raising ``AssertionError`` that lists every failed check; returns the report."""
    report = check_adapter(model, inputs, adapter, **options)
    if not report.ok:
        problems = report.failures
        raise AssertionError(
            f"adapter {report.adapter!r} on {report.model} failed {len({p.split(':', 1)[0] for p in problems})} "
            f"conformance check(s):\n" + "\n".join(f"  - {p}" for p in problems)
        )
    return report


class AdapterConformance:
    """Subclass in a test file as ``TestSomething`` to get one pytest test per check.

    Override :meth:`make_model` and :meth:`make_inputs` (and :meth:`make_adapter`, or set ``adapter``,
    when the adapter is not yet registered through an entry point). The suite runs once per class;
    each ``test_<check>`` reports its check, skipped checks as pytest skips.
    """

    adapter: ClassVar[Any] = None
    atol: ClassVar[float] = 1e-5
    skip: ClassVar[tuple[str, ...]] = ()
    cuda: ClassVar[bool | None] = None

    _reports: ClassVar[dict[type, ConformanceReport]] = {}

    def make_model(self) -> nn.Module:
        raise NotImplementedError("override make_model() to return the model to check (in eval mode)")

    def make_inputs(self) -> Any:
        raise NotImplementedError("override make_inputs() to return inputs with at least two examples")

    def make_adapter(self) -> "Adapter | str | None":
        return self.adapter

    def conformance_report(self) -> ConformanceReport:
        cls = type(self)
        if cls not in AdapterConformance._reports:
            AdapterConformance._reports[cls] = check_adapter(
                self.make_model(), self.make_inputs(), self.make_adapter(),
                atol=self.atol, skip=self.skip, cuda=self.cuda,
            )
        return AdapterConformance._reports[cls]

    def _check(self, name: str) -> None:
        report = self.conformance_report()
        result = report[name]
        if result.skipped:
            import pytest

            pytest.skip(f"{name}: {'; '.join(result.messages)}")
        if result.failed:
            raise AssertionError(
                f"conformance check {name!r} failed for adapter {report.adapter!r} on {report.model}:\n"
                + "\n".join(f"  - {m}" for m in result.messages)
            )

    def test_setup(self):
        self._check("setup")

    def test_catalog(self):
        self._check("catalog")

    def test_reach(self):
        self._check("reach")

    def test_shapes(self):
        self._check("shapes")

    def test_passive(self):
        self._check("passive")

    def test_hand_hook(self):
        self._check("hand_hook")

    def test_self_patch(self):
        self._check("self_patch")

    def test_writes(self):
        self._check("writes")

    def test_batched(self):
        self._check("batched")

    def test_dtype(self):
        self._check("dtype")

    def test_cuda(self):
        self._check("cuda")

    def test_hooks(self):
        self._check("hooks")

    def test_state(self):
        self._check("state")


# -- helpers ---------------------------------------------------------------------------------------


class _Skip(Exception):
    """Raised by a check that cannot run; the message says why."""


class _Fatal(Exception):
    """Raised by setup when nothing else can run."""


class _RaisedOnPurpose(RuntimeError):
    """The error the hooks check raises inside a forward."""


@dataclass
class _Perturb(Intervention):
    """Adds seeded noise of the activation's own scale: a write no correct reach can ignore."""

    kind: ClassVar[str] = "crosspatch.testing.perturb"
    seed: int = 0

    def apply(self, x, ctx):
        gen = torch.Generator(device=x.device).manual_seed(self.seed)
        noise = torch.randn(x.shape, generator=gen, device=x.device, dtype=torch.float32).to(x.dtype)
        return x + noise * (x.detach().abs().float().mean().to(x.dtype) + 1)


@dataclass
class _Raise(Intervention):
    kind: ClassVar[str] = "crosspatch.testing.raise"

    def apply(self, x, ctx):
        raise _RaisedOnPurpose("raised on purpose by crosspatch.testing inside a forward")


def _fmt_exc(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> str:
    if a.shape != b.shape:
        return f"shapes {tuple(a.shape)} and {tuple(b.shape)}"
    if a.numel() == 0:
        return "empty"
    return f"max |diff| = {(a.detach().double() - b.detach().double().to(a.device)).abs().max().item():.3g}"


def _close(a: torch.Tensor, b: torch.Tensor, atol: float) -> bool:
    if a.shape != b.shape:
        return False
    return torch.allclose(a.detach().double(), b.detach().double().to(a.device), rtol=RTOL, atol=atol, equal_nan=True)


def _exact(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b.to(a.device))


def _map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, Mapping):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_tensors(v, fn) for v in obj)
    return obj


def _layers(fam: SiteFamily) -> list[int | None]:
    return [None] if fam.layers is None else list(range(fam.layers))


def _keys(fam: SiteFamily) -> list[str]:
    return [site_key(fam.name, layer) for layer in _layers(fam)]


def _module_names(model: nn.Module) -> dict[int, str]:
    return {id(m): name for name, m in model.named_modules()}


def _where(name: str) -> str:
    return f"module {name!r}" if name else "the root module"


# Hook bookkeeping: every hook dict torch keeps on a module (and the global ones), by attribute name.
_MAIN_HOOKS = {
    "_forward_hooks": "forward hook",
    "_forward_pre_hooks": "forward pre-hook",
    "_backward_hooks": "backward hook",
    "_backward_pre_hooks": "backward pre-hook",
}
_GLOBAL = "<global>"


def _global_hook_dicts() -> dict[str, dict]:
    import torch.nn.modules.module as tmod

    out = {}
    for attr in dir(tmod):
        value = getattr(tmod, attr)
        if attr.startswith("_global_") and "hooks" in attr and isinstance(value, dict):
            out[attr.removeprefix("_global")] = value
    return out


def _hook_dicts(module: nn.Module) -> dict[str, dict]:
    return {k: v for k, v in vars(module).items() if "hooks" in k and isinstance(v, dict)}


def _snapshot_hooks(model: nn.Module) -> dict[str, tuple[Any, dict[str, dict]]]:
    snap = {name: (m, {k: dict(v) for k, v in _hook_dicts(m).items()}) for name, m in model.named_modules()}
    snap[_GLOBAL] = (None, {k: dict(v) for k, v in _global_hook_dicts().items()})
    return snap


def _restore_hooks(snap: dict[str, tuple[Any, dict[str, dict]]]) -> list[str]:
    """Put every hook dict back as it was; return one line per difference found."""
    problems = []
    for name, (module, saved) in snap.items():
        current = _global_hook_dicts() if module is None else _hook_dicts(module)
        where = "the global module hooks" if module is None else _where(name)
        for attr, before in saved.items():
            now = current.get(attr)
            if now is None or list(now) == list(before):
                continue
            noun = _MAIN_HOOKS.get(attr)
            added = [k for k in now if k not in before]
            removed = [k for k in before if k not in now]
            if noun is not None:
                if added:
                    problems.append(f"{len(added)} {noun}(s) left on {where}")
                if removed:
                    problems.append(f"{len(removed)} {noun}(s) it did not install removed from {where}")
            now.clear()
            now.update(before)
    return problems


# -- the suite -------------------------------------------------------------------------------------


class _Suite:
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

    # bookkeeping

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
            return CheckResult(name, _SKIPPED, ["skipped on request"])
        if fatal:
            return CheckResult(name, _SKIPPED, ["setup failed; nothing else can run"])
        try:
            messages = check()
        except _Skip as why:
            result = CheckResult(name, _SKIPPED, [str(why)])
        except _Fatal as why:
            result = CheckResult(name, _FAILED, [str(why)])
        except Exception as err:  # a check that crashes is a failed check, with the error
            log.debug("conformance check %s raised", name, exc_info=True)
            result = CheckResult(name, _FAILED, [f"raised {_fmt_exc(err)}"])
        else:
            result = CheckResult(name, _FAILED if messages else _PASSED, list(dict.fromkeys(messages)))
        log.debug("conformance check %s: %s %s", name, result.status, result.messages)
        return result

    def _skipped(self, check: str, family: str) -> bool:
        return f"{check}:{family}" in self.skip

    def _execute(self, label: str, prepared: Inputs, bounds: Sequence[Bound] = (), capture: Iterable[str] = (),
                 model: nn.Module | None = None, catalog: Catalog | None = None) -> Run:
        """The engine's run, with every hook dict compared (and restored) before and after."""
        model = self.model if model is None else model
        snap = _snapshot_hooks(model)
        try:
            return execute(model, self.adapter, catalog or self.catalog, prepared, list(bounds), list(capture))
        finally:
            for problem in _restore_hooks(snap):
                self.hook_problems.setdefault(problem, []).append(label)

    # checks

    def check_setup(self) -> list[str]:
        problems = []
        if self.adapter_arg is None or isinstance(self.adapter_arg, str):
            from ..engine.model import find_adapter

            try:
                self.adapter = find_adapter(self.model, self.adapter_arg)
            except Exception as err:
                raise _Fatal(f"finding the adapter raised {_fmt_exc(err)}") from None
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
            problems.append(f"adapter.matches(model) raised {_fmt_exc(err)}")
        if self.model.training:
            raise _Fatal("the model is in training mode (dropout, batch-norm statistics); call model.eval() first")
        self.state0 = _state(self.model)
        try:
            catalog = adapter.catalog(self.model)
        except Exception as err:
            raise _Fatal(f"adapter.catalog(model) raised {_fmt_exc(err)}") from None
        if not isinstance(catalog, Catalog):
            raise _Fatal(f"adapter.catalog(model) returned {type(catalog).__name__}, not a crosspatch Catalog")
        try:
            prepared = adapter.prepare(self.model, self.inputs)
        except Exception as err:
            raise _Fatal(f"adapter.prepare(model, inputs) raised {_fmt_exc(err)}") from None
        if not isinstance(prepared, Mapping) or not all(isinstance(k, str) for k in prepared):
            raise _Fatal(f"adapter.prepare() must return a dict of tensors by name, got {type(prepared).__name__}")
        try:
            self.n = batch_size(prepared)
        except Exception as err:
            raise _Fatal(f"the prepared inputs have no batch size: {_fmt_exc(err)}") from None
        self.prepared = dict(prepared)
        self.catalog = catalog
        try:
            run = self._execute("a plain forward", self.prepared)
        except Exception as err:
            self.catalog = None
            raise _Fatal(f"a plain forward (adapter.forward / adapter.output) raised {_fmt_exc(err)}") from None
        if not isinstance(run.output, torch.Tensor):
            self.catalog = None
            raise _Fatal(f"adapter.output() must return a tensor, got {type(run.output).__name__}")
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
                problems.append(f"{what}: its name does not round-trip through the site grammar ({_fmt_exc(err)})")
            if fam.layers is not None and (not isinstance(fam.layers, int) or isinstance(fam.layers, bool)
                                           or fam.layers < 1):
                problems.append(f"{what}: layers must be None or a positive int, got {fam.layers!r}")
            if not isinstance(fam.axes, tuple) or not all(isinstance(a, Axis) for a in fam.axes):
                problems.append(f"{what}: axes must be a tuple of Axis, got {fam.axes!r}")
                continue
            names = [a.name for a in fam.axes]
            if len(set(names)) != len(names):
                problems.append(f"{what}: axis names repeat: {names}")
            if "batch" in names:
                problems.append(f"{what}: 'batch' is the engine's name for the leading axis; do not declare it")
            for a in fam.axes:
                if not isinstance(a.name, str) or not a.name.isidentifier():
                    problems.append(f"{what}: axis name {a.name!r} is not an identifier")
                if a.size is not None and (not isinstance(a.size, int) or isinstance(a.size, bool) or a.size < 1):
                    problems.append(f"{what}: axis {a.name!r} has size {a.size!r}; use a positive int or None")
            if not callable(getattr(fam.reach, "install", None)):
                problems.append(f"{what}: its reach {type(fam.reach).__name__} has no install(layer, callback)")
        return problems

    def check_reach(self) -> list[str]:
        problems = []
        keys = [k for fam in self.catalog for k in _keys(fam)]
        try:
            run = self._execute("a run capturing every site", self.prepared, capture=keys)
        except Exception as err:
            together = _fmt_exc(err)
        else:
            self.cache, self.out_all, self.families = run.cache, run.output, list(self.catalog)
            missing = [k for k in keys if k not in run.cache]
            return [f"{k}: was reached but nothing was captured" for k in missing]
        # Find out which families fail on their own.
        tensors, axes = {}, {}
        for fam in self.catalog:
            try:
                run = self._execute(f"a run capturing {fam.name}", self.prepared, capture=_keys(fam))
            except Exception as err:
                problems.append(f"{fam.name}: {_fmt_exc(err)}")
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
            problems.append(f"adapter.sizes(inputs) raised {_fmt_exc(err)}")
        for fam in self.families:
            for key in _keys(fam):
                if key not in self.cache:
                    continue
                value = self.cache[key]
                if not isinstance(value, torch.Tensor):
                    problems.append(f"{key}: the reach passed a {type(value).__name__} to the callback, not a tensor")
                    continue
                expected = [self.n] + [a.size or sizes.get(a.name) for a in fam.axes]
                declared = ", ".join([f"batch={self.n}"] + [
                    f"{a.name}={a.size or sizes.get(a.name) or '?'}" for a in fam.axes
                ])
                if value.ndim != len(expected):
                    problems.append(
                        f"{key}: captured shape {tuple(value.shape)} has {value.ndim} axes; the catalog "
                        f"declares {len(expected)}: [{declared}]"
                    )
                    continue
                wrong = [
                    f"{name} is {got}, not {want}"
                    for name, got, want in zip(["batch", *fam.axis_names], value.shape, expected)
                    if want is not None and got != want
                ]
                if wrong:
                    problems.append(
                        f"{key}: captured shape {tuple(value.shape)} does not match the catalog's "
                        f"[{declared}]: {'; '.join(wrong)}"
                    )
        return problems

    def check_passive(self) -> list[str]:
        if self.out_all is None:
            raise _Skip("needs every site captured in one run (see reach)")
        if _close(self.out_all, self.plain, self.atol):
            return []
        return [f"capturing every site changed the output ({_max_diff(self.out_all, self.plain)})"]

    def check_hand_hook(self) -> list[str]:
        self._need_cache()
        names = _module_names(self.model)
        seen: dict[str, torch.Tensor] = {}
        targets: list[tuple[str, str, str]] = []  # (key, module name, "output" | "input")
        handles = []
        try:
            for fam in self.families:
                reach = fam.reach
                if type(reach) not in (ModuleOutput, ModuleInput) and not (
                    isinstance(reach, (ModuleOutput, ModuleInput)) and callable(getattr(reach, "module", None))
                ):
                    continue
                for layer, key in zip(_layers(fam), _keys(fam)):
                    if key not in self.cache:
                        continue
                    if callable(getattr(reach, "module", None)):
                        module = reach.module(layer)
                    else:
                        module = submodule(reach.root, reach.path, layer)
                    kind = "output" if isinstance(reach, ModuleOutput) else "input"
                    targets.append((key, names.get(id(module), type(module).__name__), kind))
                    handles.append(_raw_hook(module, reach, key, seen))
            if not targets:
                raise _Skip("no family is reached through ModuleOutput or ModuleInput")
            with torch.inference_mode():
                self.adapter.forward(self.model, self.prepared)
        finally:
            for h in handles:
                h.remove()
        problems = []
        for key, where, kind in targets:
            if key not in seen:
                problems.append(f"{key}: a raw hook on the {kind} of {_where(where)} never fired")
            elif not _close(self.cache[key], seen[key], self.atol):
                problems.append(
                    f"{key}: the engine's capture differs from a raw hook on the {kind} of {_where(where)} "
                    f"({_max_diff(self.cache[key], seen[key])}); is the activation modified in place later?"
                )
        return problems

    def _need_cache(self) -> None:
        if not self.cache:
            raise _Skip("needs captured sites (see reach)")

    def _writable(self, check: str) -> list[SiteFamily]:
        return [f for f in self.families if f.writable and not self._skipped(check, f.name)]

    def check_self_patch(self) -> list[str]:
        self._need_cache()
        families = self._writable("self_patch")
        if not families:
            raise _Skip("no writable family was reached")
        keys = list(self.cache)
        if self.out_all is not None:
            source, base_out, base_cache = self.cache, self.out_all, self.cache
        else:
            base = self._execute("a run capturing the reachable sites", self.prepared, capture=keys)
            source, base_out, base_cache = base.cache, base.output, base.cache
        problems = []
        for fam in families:
            bounds = [Bound(Site(fam.name, layer), Patch(source)) for layer in _layers(fam)]
            try:
                run = self._execute(f"a self-patch of {fam.name}", self.prepared, bounds, capture=keys)
            except Exception as err:
                problems.append(f"{fam.name}: a Patch with the activation of the same inputs raised {_fmt_exc(err)}")
                continue
            if not _exact(run.output, base_out):
                problems.append(
                    f"{fam.name}: patching every layer with its own activation changed the output "
                    f"({_max_diff(run.output, base_out)}); the write-back is not exact"
                )
                continue
            for key in keys:
                if not _exact(run.cache[key], base_cache[key]):
                    problems.append(
                        f"{fam.name}: patching it with its own activation changed {key} "
                        f"({_max_diff(run.cache[key], base_cache[key])})"
                    )
                    break
        return problems

    def check_writes(self) -> list[str]:
        families = self._writable("writes")
        if not families:
            raise _Skip("no writable family was reached")
        n, plain = self.n, self.plain
        batch_first = plain.ndim > 0 and plain.shape[0] == n
        problems = []
        for fam in families:
            layers = _layers(fam)
            per_run = max(1, 64 // n)
            for start in range(0, len(layers), per_run):
                chunk = layers[start : start + per_run]
                big = repeat_rows(self.prepared, len(chunk))
                bounds = [
                    Bound(Site(fam.name, layer), _Perturb(seed=i + 1), rows=slice(i * n, i * n + 1))
                    for i, layer in enumerate(chunk)
                ]
                label = f"a write at {fam.name}" + ("" if fam.layers is None else f" layers {chunk[0]}..{chunk[-1]}")
                try:
                    out = self._execute(label, big, bounds).output
                except Exception as err:
                    problems.append(f"{fam.name}: writing a perturbed value raised {_fmt_exc(err)}")
                    break
                if not batch_first or out.shape[0] != n * len(chunk):  # rows cannot be told apart
                    base = self._execute(f"{label}, without the write", big).output
                    if _close(out, base, self.atol):
                        problems.append(f"{fam.name}: writing perturbed values left the output unchanged")
                    continue
                for i, layer in enumerate(chunk):
                    key = site_key(fam.name, layer)
                    block = out[i * n : (i + 1) * n]
                    if _close(block[0], plain[0], self.atol):
                        problems.append(
                            f"{key}: writing a perturbed value (row 0) left the output unchanged: the reach ignores "
                            f"the value the callback returns, or the site does not reach the output (a dead end, "
                            f"such as a posterior's log-variance when the mean is decoded: skip it with "
                            f"skip=['writes:{fam.name}'])"
                        )
                    if n > 1 and not _close(block[1:], plain[1:], self.atol):
                        problems.append(
                            f"{key}: a write bound to row 0 also changed the output of other rows "
                            f"({_max_diff(block[1:], plain[1:])}); writes must stay in their rows"
                        )
        return problems

    def check_batched(self) -> list[str]:
        self._need_cache()
        if self.n < 2:
            raise _Skip(f"needs inputs with at least 2 examples, got {self.n}")
        if self.out_all is None:
            raise _Skip("needs every site captured in one run (see reach)")
        keys = list(self.cache)
        problems = []
        batch_first = self.out_all.ndim > 0 and self.out_all.shape[0] == self.n
        for i in range(self.n):
            one = {
                k: v[i : i + 1] if isinstance(v, torch.Tensor) and v.ndim > 0 and v.shape[0] == self.n else v
                for k, v in self.prepared.items()
            }
            run = self._execute(f"example {i} alone", one, capture=keys)
            if batch_first and not _close(run.output, self.out_all[i : i + 1], self.atol):
                problems.append(
                    f"output: example {i} alone differs from row {i} of the batched run "
                    f"({_max_diff(run.output, self.out_all[i : i + 1])})"
                )
            for key in keys:
                if not _close(run.cache[key], self.cache[key][i : i + 1], self.atol):
                    problems.append(
                        f"{key}: example {i} alone differs from row {i} of the batched run "
                        f"({_max_diff(run.cache[key], self.cache[key][i : i + 1])})"
                    )
        return problems

    def _copy_run(self, label: str, model: nn.Module, inputs: Any) -> tuple[Inputs, Run]:
        catalog = self.adapter.catalog(model)
        prepared = self.adapter.prepare(model, inputs)
        keys = [k for fam in self.families for k in _keys(fam) if fam.name in catalog]
        return prepared, self._execute(label, prepared, capture=keys, model=model, catalog=catalog)

    def check_dtype(self) -> list[str]:
        if not any(p.is_floating_point() for p in self.model.parameters()):
            raise _Skip("the model has no floating-point parameters")
        model = copy.deepcopy(self.model).to(torch.float64)
        inputs = _map_tensors(self.inputs, lambda t: t.to(torch.float64) if t.is_floating_point() else t)
        _, run = self._copy_run("a float64 run", model, inputs)
        problems = []
        if run.output.is_floating_point() and run.output.dtype != torch.float64:
            problems.append(f"output: the float64 model returned {run.output.dtype}")
        for key, value in run.cache.items():
            if value.is_floating_point() and value.dtype != torch.float64:
                problems.append(f"{key}: captured as {value.dtype} from a float64 model")
        return problems

    def check_cuda(self) -> list[str]:
        available = torch.cuda.is_available()
        if self.cuda is False:
            raise _Skip("turned off (cuda=False)")
        if not available:
            if self.cuda:
                return ["cuda=True but CUDA is not available"]
            raise _Skip("CUDA is not available on this machine; the device sub-check did not run")
        model = copy.deepcopy(self.model).to("cuda")
        prepared, run = self._copy_run("a CUDA run", model, self.inputs)  # inputs stay on the CPU: prepare moves them
        problems = [
            f"prepare(): input {k!r} is on {v.device}, not on the model's device"
            for k, v in prepared.items()
            if isinstance(v, torch.Tensor) and v.device.type != "cuda"
        ]
        if run.output.device.type != "cuda":
            problems.append(f"output: on {run.output.device} for a model on CUDA")
        for key, value in run.cache.items():
            if value.device.type != "cuda":
                problems.append(f"{key}: captured on {value.device} for a model on CUDA")
        return problems

    def check_hooks(self) -> list[str]:
        problems: list[str] = []
        keys = [k for fam in self.families for k in _keys(fam)]
        writable = [f for f in self.families if f.writable]
        # 1. The user's own hooks survive a run that reads and writes every site.
        sentinels = []
        try:
            for module in self.model.modules():
                sentinels.append(module.register_forward_hook(lambda *a: None))
                sentinels.append(module.register_forward_pre_hook(lambda *a: None))
            if self.cache is not None and writable:
                bounds = [Bound(Site(f.name, layer), Patch(self.cache)) for f in writable for layer in _layers(f)
                          if site_key(f.name, layer) in self.cache]
                try:
                    self._execute("a run reading and writing every site, with hooks of your own present",
                                  self.prepared, bounds, capture=keys)
                except Exception:  # why it raised is the business of the other checks; hooks are compared anyway
                    log.debug("conformance: the run with hooks of your own raised", exc_info=True)
        finally:
            for h in sentinels:
                h.remove()
        # 2. A forward that raises midway.
        if writable:
            fam = writable[-1]
            bounds = [Bound(Site(fam.name, _layers(fam)[-1]), _Raise())]
            label = f"a run that raised inside an intervention at {bounds[0].site}"
            extra = None
        else:
            bounds = []
            label = "a run whose forward raised"

            def boom(module, args):
                raise _RaisedOnPurpose("raised on purpose by crosspatch.testing before the forward")

            extra = self.model.register_forward_pre_hook(boom)
        try:
            self._execute(label, self.prepared, bounds, capture=keys)
        except Exception:  # the error itself (ours, or an earlier one another check reports) is expected
            log.debug("conformance: %s", label, exc_info=True)
        else:
            problems.append(f"{label}: the error raised in the forward was swallowed; it must reach the caller")
        finally:
            if extra is not None:
                extra.remove()
        leaks = [
            f"{problem} after {labels[0]}" + (f" (and {len(labels) - 1} other run(s))" if len(labels) > 1 else "")
            for problem, labels in self.hook_problems.items()
        ]
        return leaks + problems

    def check_state(self) -> list[str]:
        problems = []
        if self.model.training != self.training0:
            problems.append(f"the model's training flag changed to {self.model.training}")
        now = _state(self.model)
        for name, before in self.state0.items():
            after = now.get(name)
            if after is None:
                problems.append(f"{name}: parameter or buffer disappeared")
            elif not _exact(after, before):
                problems.append(f"{name}: parameter or buffer changed ({_max_diff(after, before)})")
        added = sorted(set(now) - set(self.state0))
        if added:
            problems.append(f"parameters or buffers added to the model: {', '.join(added)}")
        out = self._execute("a plain forward at the end", self.prepared).output
        if not _exact(out, self.plain):
            problems.append(
                f"a plain forward after the suite differs from one before it ({_max_diff(out, self.plain)}); "
                f"a run left state behind (a switched implementation, a changed attribute)"
            )
        return problems


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(model.named_buffers(remove_duplicate=False))
    return {k: v.detach().clone() for k, v in tensors.items()}


def _raw_hook(module: nn.Module, reach: Any, key: str, seen: dict[str, torch.Tensor]):
    """A hook of our own, the way a user would write it, recording a copy of the activation."""
    if isinstance(reach, ModuleOutput):
        index = reach.index

        def out_hook(mod, args, output):
            value = output if isinstance(output, torch.Tensor) else output[index]
            seen[key] = value.detach().clone()

        return module.register_forward_hook(out_hook)
    name, position = reach.name, reach.position

    def in_hook(mod, args, kwargs):
        value = kwargs[name] if name is not None and name in kwargs else args[position]
        seen[key] = value.detach().clone()

    return module.register_forward_pre_hook(in_hook, with_kwargs=True)
