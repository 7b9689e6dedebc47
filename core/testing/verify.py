"""``verify``: which site families of one model are exact, approximate, unavailable or failing.

It runs the conformance suite (:func:`~crosspatch.testing.check_adapter`) and the adapter's own
per-family checks (:meth:`~crosspatch.engine.adapter.Adapter.family_oracles`: arithmetic identities
and hand-written hooks) and reads both per family (the suite's problems name their family and kind as
data: :class:`~crosspatch.testing.report.Problem`). A family is *exact* when every check holds to
float32 rounding (``exact_atol``), *approximate* when the largest difference stays within ``atol``
(a family whose writes never reach the output is exact with a note saying so),
*unavailable* when the adapter lists it as not served (with the reason), and *failed* otherwise. The
command ``crosspatch verify`` prints :meth:`Verification.table` and exits non-zero when a family fails.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..engine.model import wrap
from .check import check_adapter
from .report import DEAD_END, FAILURE, ConformanceReport

__all__ = ["FamilyStatus", "Verification", "verify"]

EXACT, APPROXIMATE, UNAVAILABLE, FAILED = "exact", "approximate", "unavailable", "failed"


@dataclass
class FamilyStatus:
    """One family's verdict, the largest difference measured (None: nothing measured) and why."""

    family: str
    status: str
    error: float | None = None
    note: str = ""


@dataclass
class Verification:
    """The verdict per family of one model, and the conformance report behind it."""

    model: str
    adapter: str
    families: list[FamilyStatus]
    conformance: ConformanceReport
    general: list[str] = field(default_factory=list)  # conformance failures that name no family

    @property
    def ok(self) -> bool:
        return not self.general and all(f.status != FAILED for f in self.families)

    def counts(self) -> dict[str, int]:
        out = {EXACT: 0, APPROXIMATE: 0, UNAVAILABLE: 0, FAILED: 0}
        for f in self.families:
            out[f.status] += 1
        return out

    def table(self) -> str:
        rows = [("family", "status", "largest error", "note")]
        for f in self.families:
            rows.append((f.family, f.status, "-" if f.error is None else f"{f.error:.1e}", f.note))
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = [f"verify {self.model} (adapter {self.adapter!r}): " + ("ok" if self.ok else "FAILED")]
        lines += ["  " + "  ".join(r[i].ljust(widths[i]) for i in range(3)) + (f"  {r[3]}" if r[3] else "") for r in rows]
        lines += [f"  conformance: {line}" for line in self.general]
        counts = self.counts()
        lines.append("  " + ", ".join(f"{n} {status}" for status, n in counts.items()))
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model, "adapter": self.adapter, "ok": self.ok, "counts": self.counts(),
            "families": [vars(f) for f in self.families], "conformance_failures": self.conformance.failures,
        }


def verify(
    model: nn.Module, inputs: Any = None, adapter: Any = None, *, atol: float = 1e-4, exact_atol: float = 1e-5,
    cuda: bool | None = None,
) -> Verification:
    """Verify every site family of ``model`` (inputs: the adapter's example inputs when None)."""
    m = wrap(model, adapter)
    if inputs is None:
        inputs = m.adapter.example_inputs(model)
    report = check_adapter(model, inputs, m.adapter, cuda=cuda)
    oracles = m.adapter.family_oracles(model)
    catalog = m.catalog
    # Each conformance problem names its family and kind as data (crosspatch.testing.report.Problem).
    problems = [(f"{check}: {p}", p) for check, p in report.problems]
    families: list[FamilyStatus] = []
    for fam in catalog:
        named = [line for line, p in problems if p.family == fam.name and p.kind == FAILURE]
        dead = [line for line, p in problems if p.family == fam.name and p.kind == DEAD_END]
        error, broken = oracles.get(fam.name, (None, None))
        if named or broken:
            families.append(FamilyStatus(fam.name, FAILED, error, (named or [broken])[0]))
        elif error is not None and error > exact_atol:
            status = APPROXIMATE if error <= atol else FAILED
            families.append(FamilyStatus(fam.name, status, error, "" if status == APPROXIMATE else f"difference above {atol}"))
        else:
            families.append(FamilyStatus(fam.name, EXACT, error, "writes do not reach the output (a dead end)" if dead else ""))
    families += [FamilyStatus(name, UNAVAILABLE, None, why) for name, why in catalog.unavailable.items()]
    general = [line for line, p in problems if (p.family is None or p.family not in catalog) and p.kind == FAILURE]
    return Verification(type(model).__name__, m.adapter.name, families, report, general)
