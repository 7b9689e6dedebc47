"""Conformance problems carry their site family and kind as data (crosspatch.testing.report.Problem), and
``verify`` reads families from that data, not from the wording."""

from __future__ import annotations

import pickle

import torch

from conftest import ToyNet, toy_adapter
from crosspatch.engine.reach import ModuleOutput
from crosspatch.sites.catalog import Axis, Catalog, SiteFamily
from crosspatch.testing import check_adapter, verify
from crosspatch.testing.report import DEAD_END, FAILURE, Problem

POS, DIM = Axis("pos"), Axis("dim", 4)


class SideNet(ToyNet):
    """ToyNet with a side module whose output the model drops: writes there are a dead end."""

    def __init__(self):
        super().__init__()
        self.side = torch.nn.Linear(4, 4)

    def forward(self, x):
        self.side(x)
        return super().forward(x)


def adapter_with(families):
    class Variant(type(toy_adapter())):
        def catalog(self, model):
            return Catalog(families(model), "ToyNet")

    return Variant()


def inputs() -> torch.Tensor:
    return torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(0))


def test_problems_name_their_family_and_kind():
    # "hidden.x" is a family whose name another family's site key ("hidden.0") would be mistaken for in text.
    families = lambda m: [  # noqa: E731
        SiteFamily("hidden", (POS, Axis("dim", 5)), ModuleOutput(m, "layers.{layer}"), 2),
        SiteFamily("hidden.x", (POS, DIM), ModuleOutput(m, "side")),
    ]
    report = check_adapter(SideNet().eval(), inputs(), adapter_with(families))
    by_check: dict[str, list[Problem]] = {}
    for check, problem in report.problems:
        by_check.setdefault(check, []).append(problem)
    assert {(p.family, p.kind) for p in by_check["shapes"]} == {("hidden", FAILURE)}
    assert {(p.family, p.kind) for p in by_check["writes"]} == {("hidden.x", DEAD_END)}
    assert [f"{c}: {p}" for c, p in report.problems] == report.failures  # the same lines, as data
    copy = pickle.loads(pickle.dumps(by_check["writes"][0]))
    assert (copy, copy.family, copy.kind) == (by_check["writes"][0], "hidden.x", DEAD_END)


def test_verify_reads_families_from_the_problems():
    families = lambda m: [  # noqa: E731
        SiteFamily("hidden", (POS, DIM), ModuleOutput(m, "layers.{layer}"), 2),
        SiteFamily("hidden.x", (POS, DIM), ModuleOutput(m, "side")),
    ]
    result = verify(SideNet().eval(), inputs(), adapter_with(families), cuda=False)
    statuses = {f.family: f for f in result.families}
    assert statuses["hidden"].status == "exact" and not statuses["hidden"].note
    assert statuses["hidden.x"].status == "exact" and "dead end" in statuses["hidden.x"].note
    assert result.ok and not result.general


class Float32Out(ToyNet):
    """Returns float32 whatever its weights (as models that upcast their logits do)."""

    def forward(self, x):
        return super().forward(x).float()


def test_a_model_that_casts_its_own_output_skips_the_dtype_check_with_the_reason():
    families = lambda m: [SiteFamily("hidden", (POS, DIM), ModuleOutput(m, "layers.{layer}"), 2)]  # noqa: E731
    report = check_adapter(Float32Out().eval(), inputs(), adapter_with(families), cuda=False)
    assert report["dtype"].skipped and "itself returns torch.float32" in report["dtype"].messages[0]
    assert report.ok, report.failures
