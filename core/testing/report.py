"""The report of a conformance run: one :class:`CheckResult` per check, gathered in a :class:`ConformanceReport`.

These are the types :func:`~crosspatch.testing.check_adapter` returns and the pytest mixin reads; they
hold outcomes and their wording only, so they import nothing of the suite or the engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field

PASSED, FAILED, SKIPPED = "passed", "failed", "skipped"
#: Kinds of :class:`Problem`: a failure, or a write that never reaches the output (a dead end, which a
#: family may be: an output the model drops, a router input a small change does not re-route).
FAILURE, DEAD_END = "failure", "dead_end"


class Problem(str):
    """One message of a check (a ``str``, worded for people) carrying as data the site family it is about
    (``None``: the model, the adapter or the output as a whole) and its kind (:data:`FAILURE` or
    :data:`DEAD_END`)."""

    family: str | None
    kind: str

    def __new__(cls, message: str, family: str | None = None, kind: str = FAILURE) -> "Problem":
        if kind not in (FAILURE, DEAD_END):
            raise ValueError(f"kind must be {FAILURE!r} or {DEAD_END!r}, got {kind!r}")
        obj = super().__new__(cls, message)
        obj.family, obj.kind = family, kind
        return obj

    def __reduce__(self):
        return Problem, (str(self), self.family, self.kind)


@dataclass
class CheckResult:
    """The outcome of one check: ``passed``, ``failed`` (``messages`` say why) or ``skipped`` (and why)."""

    name: str
    status: str
    messages: list[str] = field(default_factory=list)

    @property
    def problems(self) -> list[Problem]:
        """The messages as :class:`Problem` (a plain message is about no family, a failure)."""
        return [m if isinstance(m, Problem) else Problem(m) for m in self.messages]

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
    def problems(self) -> list[tuple[str, Problem]]:
        """Every problem of a failed check with the check's name: what :attr:`failures` words, as data."""
        return [(r.name, p) for r in self.results.values() if r.failed for p in r.problems]

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
