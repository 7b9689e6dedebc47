"""The conformance suite for adapters: run it against your adapter before you publish a plugin.

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

Each problem a check finds is a :class:`Problem`: its message, and as data the site family it is about and
its kind (a failure, or a write that never reaches the output).

Built on the engine only; nothing in crosspatch imports it. The modules: ``report`` (the result types),
``runner`` (the list of checks and the machinery running them), the checks by group (``catalog_checks``,
``capture_checks``, ``write_checks``, ``device_checks``, ``cleanup_checks``) with their helpers
(``tensors``, ``hooks``, ``probes``), ``check`` (:func:`check_adapter`, :func:`assert_conforms`) and
``pytest_mixin`` (:class:`AdapterConformance`), and ``verify`` (per-family verdicts: the suite read
family by family together with the adapter's own oracles, what ``crosspatch verify`` prints).
"""

from .check import assert_conforms, check_adapter
from .pytest_mixin import AdapterConformance
from .report import CheckResult, ConformanceReport, Problem
from .runner import CHECKS
from .verify import FamilyStatus, Verification, verify

__all__ = [
    "CHECKS",
    "AdapterConformance",
    "CheckResult",
    "ConformanceReport",
    "Problem",
    "assert_conforms",
    "check_adapter",
    "FamilyStatus",
    "Verification",
    "verify",
]
