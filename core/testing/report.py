"""The report of a conformance run: one :class:`CheckResult` per check, gathered in a :class:`ConformanceReport`.

These are the types :func:`~crosspatch.testing.check_adapter` returns and the pytest mixin reads; they
hold outcomes and their wording only, so they import nothing of the suite or the engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field

PASSED, FAILED, SKIPPED = "passed", "failed", "skipped"


@dataclass
class CheckResult:
    """The outcome of one check: ``passed``, ``failed`` (``messages`` say why) or ``skipped`` (and why)."""

    name: str
    status: str
    messages: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.status == PASSED

    @property
    def failed(self) -> bool:
        return self.status == FAILED

    @property
    def skipped(self) -> bool:
        return self.status == SKIPPED


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
