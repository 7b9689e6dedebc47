"""The pytest mixin :class:`AdapterConformance`: subclass it in a test file and each conformance check
becomes one pytest test.

The suite runs once per subclass (the report is kept per class); a failed check fails its test with the
check's messages, a skipped one is a pytest skip. pytest is imported only when a check is skipped, so
importing :mod:`crosspatch.testing` does not need it.
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import nn

from ..engine.adapter import Adapter
from .check import check_adapter
from .report import ConformanceReport


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
