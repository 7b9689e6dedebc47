"""The two ways to run the suite from code: :func:`check_adapter` returns a :class:`ConformanceReport`,
:func:`assert_conforms` raises ``AssertionError`` naming every failed check.

The suite they run is assembled here from its check groups, so nothing below this module knows all of
them; :class:`~crosspatch.testing.pytest_mixin.AdapterConformance` runs it through :func:`check_adapter`.
"""

from __future__ import annotations

from typing import Any, Iterable

from torch import nn

from ..engine.adapter import Adapter
from .capture_checks import CaptureChecks
from .catalog_checks import CatalogChecks
from .cleanup_checks import CleanupChecks
from .device_checks import DeviceChecks
from .report import ConformanceReport
from .write_checks import WriteChecks


class Suite(CatalogChecks, CaptureChecks, WriteChecks, DeviceChecks, CleanupChecks):
    """Every check of :data:`CHECKS` on one model, adapter and inputs; :meth:`run` gives the report."""


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
    return Suite(model, inputs, adapter, atol, skip, cuda).run()


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
