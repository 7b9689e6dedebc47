"""Mediation analysis on a linear model where TE, NDE and NIE are known in closed form."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import crosspatch as cp
from crosspatch.engine.adapter import Adapter, model_device
from crosspatch.sites.catalog import Axis, Catalog, SiteFamily
from crosspatch.methods.mediation import Mediation, mediation
from crosspatch.engine.reach import ModuleOutput


class MedNet(nn.Module):
    """y = out(med(x)) + direct(x): a mediated path and a direct path, both linear."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.med, self.out, self.direct = nn.Linear(3, 2), nn.Linear(2, 1), nn.Linear(3, 1)

    def forward(self, x):
        return self.out(self.med(x)) + self.direct(x)


class MedAdapter(Adapter):
    name = "mednet"

    def matches(self, model):
        return isinstance(model, MedNet)

    def catalog(self, model):
        return Catalog(
            [
                SiteFamily("mediator", (Axis("dim", 2),), ModuleOutput(model, "med")),
                SiteFamily("direct", (Axis("dim", 1),), ModuleOutput(model, "direct")),
            ],
            "MedNet",
        )

    def prepare(self, model, inputs):
        return {"x": inputs.to(model_device(model))}

    def forward(self, model, inputs):
        return model(inputs["x"])


MU = torch.tensor([1.0, -0.5, 2.0])


@pytest.fixture
def setup():
    net = MedNet().eval()
    gen = torch.Generator().manual_seed(1)
    clean = torch.randn(200, 3, generator=gen)
    corrupt = clean + MU + 0.5 * torch.randn(200, 3, generator=gen)
    return cp.wrap(net, MedAdapter()), net, clean, corrupt


def _metric(out):
    return out[:, 0]


def test_closed_form_per_prompt_and_additivity(setup):
    m, net, clean, corrupt = setup
    res = mediation(m, clean, corrupt, "mediator", _metric, n_boot=200)
    with torch.no_grad():
        mediated = (net.out.weight @ net.med.weight).view(-1)  # d y / d x through the mediator
        direct = net.direct.weight.detach().view(-1)
        dx = (corrupt - clean).double()
    np.testing.assert_allclose(res.per_prompt["NIE"], (dx @ mediated.double()).numpy(), atol=1e-5)
    np.testing.assert_allclose(res.per_prompt["NDE"], (dx @ direct.double()).numpy(), atol=1e-5)
    np.testing.assert_allclose(res.per_prompt["TE"], (dx @ (mediated + direct).double()).numpy(), atol=1e-5)
    assert abs(res.te - res.nde - res.nie) < 1e-5 and abs(res.interaction) < 1e-5
    assert isinstance(res, Mediation) and res.proportion_mediated == pytest.approx(res.nie / res.te)


def test_confidence_intervals_cover_the_population_truth(setup):
    m, net, clean, corrupt = setup
    res = mediation(m, clean, corrupt, "mediator", _metric, n_boot=500, level=0.95, seed=3)
    with torch.no_grad():
        truth = {
            "NIE": float((net.out.weight @ net.med.weight).view(-1) @ MU),
            "NDE": float(net.direct.weight.view(-1) @ MU),
        }
    truth["TE"] = truth["NIE"] + truth["NDE"]
    for name, value in truth.items():
        low, high = res.ci[name]
        assert low < res.estimates[name] < high
        assert low <= value <= high, (name, value, res.ci[name])
    result = res.to_result()
    assert result.dims == ("effect", "stat") and result.coords["effect"] == ["TE", "NDE", "NIE"]
    assert result.metadata["method"] == "mediation" and result.metadata["n_boot"] == 500


def test_reproducible_by_seed_and_partial_mediators(setup):
    m, net, clean, corrupt = setup
    a = mediation(m, clean, corrupt, "mediator", _metric, n_boot=100, seed=7)
    b = mediation(m, clean, corrupt, "mediator", _metric, n_boot=100, seed=7)
    c = mediation(m, clean, corrupt, "mediator", _metric, n_boot=100, seed=8)
    assert a.ci == b.ci and a.ci != c.ci and a.estimates == c.estimates
    # One mediator dimension carries its own share of the indirect effect.
    part = mediation(m, clean, corrupt, "mediator[dim=0]", _metric, n_boot=10)
    with torch.no_grad():
        share = (net.out.weight[0, 0] * (corrupt - clean) @ net.med.weight[0]).detach()
    np.testing.assert_allclose(part.per_prompt["NIE"], share.double().numpy(), atol=1e-5)
    # The direct path as the "mediator": its NIE is the NDE above.
    swap = mediation(m, clean, corrupt, "direct", _metric, n_boot=10)
    np.testing.assert_allclose(swap.nie, a.nde, atol=1e-5)
    with pytest.raises(ValueError, match="n_boot"):
        mediation(m, clean, corrupt, "mediator", _metric, n_boot=0)
