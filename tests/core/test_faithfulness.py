"""Faithfulness: 1 for the full circuit and 0 for the empty one by construction, a closed form on a
toy with additive units, and the spread across ablation kinds on a tiny GPT-2."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import crosspatch as cp
from crosspatch.engine.adapter import Adapter, model_device
from crosspatch.sites.catalog import Axis, Catalog, SiteFamily
from crosspatch.methods.faithfulness import ABLATIONS, faithfulness, faithfulness_curve, faithfulness_table, plot_curve
from crosspatch.engine.reach import ModuleOutput

K = 6


class Units(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("w", torch.arange(1.0, K + 1))

    def forward(self, x):
        return x * self.w


class UnitNet(nn.Module):
    """x [batch, pos, K] -> units = x * w -> out = [sum(units), 0]: every unit adds its share."""

    def __init__(self):
        super().__init__()
        self.units = Units()

    def forward(self, x):
        total = self.units(x).sum(-1, keepdim=True)
        return torch.cat([total, torch.zeros_like(total)], dim=-1)


class UnitAdapter(Adapter):
    name = "unitnet"

    def matches(self, model):
        return isinstance(model, UnitNet)

    def catalog(self, model):
        return Catalog([SiteFamily("units", (Axis("pos"), Axis("unit", K)), ModuleOutput(model, "units"))], "UnitNet")

    def prepare(self, model, inputs):
        return {"x": inputs.to(model_device(model))}

    def forward(self, model, inputs):
        return model(inputs["x"])

    def sizes(self, inputs):
        return {"pos": inputs["x"].shape[1]}


def _units():
    m = cp.wrap(UnitNet(), UnitAdapter())
    x = torch.rand(5, 3, K, generator=torch.Generator().manual_seed(0)) + 0.1
    return m, x


def _metric(out):
    return out[:, -1, 0]


def test_curve_is_monotone_and_matches_the_closed_form(tmp_path):
    m, x = _units()
    ranking = [f"units[unit={i}]" for i in (5, 0, 3, 1, 4, 2)]
    curve = faithfulness_curve(m, x, ranking, "units[unit=*]", _metric, ablation="zero")
    assert curve.dims == ("size",) and curve.coords["size"] == list(range(K + 1))
    assert np.all(np.diff(curve.values) > 0) and curve.values[0] == 0.0 and curve.values[-1] == 1.0
    contrib = (x[:, -1] * torch.arange(1.0, K + 1)).mean(0).double().numpy()  # per unit, averaged over prompts
    order = [5, 0, 3, 1, 4, 2]
    expected = np.concatenate([[0.0], np.cumsum(contrib[order])]) / contrib.sum()
    np.testing.assert_allclose(curve.values, expected, atol=1e-6)
    plot_curve(curve).savefig(tmp_path / "curve.png")
    assert (tmp_path / "curve.png").stat().st_size > 1000
    # A Result ranking (e.g. from attribution patching) is ranked by |value|.
    scores = cp.Result(np.array([1, 5, 2, 4, 3, 6.0]), ("unit",))
    ranked = faithfulness_curve(m, x, scores, "units[unit=*]", _metric, ablation="zero", sizes=[0, 2, 6])
    assert ranked.metadata["ranking"][:2] == ["units[unit=5]", "units[unit=1]"]
    np.testing.assert_allclose(ranked.values, [0.0, contrib[[5, 1]].sum() / contrib.sum(), 1.0], atol=1e-6)


@pytest.mark.parametrize("ablation", ABLATIONS)
def test_full_circuit_is_one_and_empty_circuit_is_zero_on_gpt2(ablation, pair):
    pytest.importorskip("transformers")
    from conftest import tiny_gpt2

    clean, corrupt = pair
    model = tiny_gpt2()
    answer = clean[:, -1]
    metric = cp.metrics.logit_diff(answer, (answer + 1) % 100)
    full = faithfulness(model, clean, "head_out.*[head=*]", "head_out.*[head=*]", metric, ablation=ablation, reference=corrupt)
    empty = faithfulness(model, clean, [], "head_out.*[head=*]", metric, ablation=ablation, reference=corrupt)
    assert float(full.values) == 1.0 and float(empty.values) == 0.0
    assert full.metadata["kl"] == pytest.approx(0.0, abs=1e-9) and empty.metadata["kl"] > 0


def test_ablation_kinds_disagree_on_gpt2(pair):
    pytest.importorskip("transformers")
    from conftest import tiny_gpt2

    clean, corrupt = pair
    answer = clean[:, -1]
    metric = cp.metrics.logit_diff(answer, (answer + 1) % 100)
    circuit = ["head_out.1[head=0]", "head_out.0[head=2]", "head_out.1[head=3]"]
    table = faithfulness_table(tiny_gpt2(), clean, circuit, "head_out.*[head=*]", metric, reference=corrupt)
    assert table.dims == ("ablation",) and table.coords["ablation"] == list(ABLATIONS)
    assert np.ptp(table.values) > 0.05, table.values  # the known reliability problem
    assert set(table.metadata["kl"]) == set(ABLATIONS) and all(v >= 0 for v in table.metadata["kl"].values())
    frame = table.to_pandas()
    assert list(frame["ablation"]) == list(ABLATIONS)


def test_bad_circuits_and_kinds_are_refused():
    m, x = _units()
    with pytest.raises(ValueError, match="not among the candidates"):
        faithfulness(m, x, "units[unit=1:3]", "units[unit=*]", _metric)
    with pytest.raises(ValueError, match="unknown ablation"):
        faithfulness(m, x, "units[unit=1]", "units[unit=*]", _metric, ablation="median")
