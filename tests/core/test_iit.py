"""IIT and strict IIT on a tiny MLP: after training, variable A sits at the chosen site."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import crosspatch as cp
from crosspatch.methods.iit import interchange_accuracy, interchange_effect, train_iit

V, H = 5, 32
SITE_A, SITE_B, NULL = "hidden.0[dim=0:8]", "hidden.0[dim=8:16]", "hidden.0[dim=16:32]"


class MLP(nn.Module):
    """one-hot a ++ one-hot b [n, 10] -> Linear, ReLU, Linear, ReLU -> Linear -> (a + b) mod 5."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.layers = nn.ModuleList([nn.Linear(2 * V, H), nn.Linear(H, H)])
        self.head = nn.Linear(H, V)

    def forward(self, x):
        for layer in self.layers:
            x = torch.relu(layer(x))
        return self.head(x)


def mlp_adapter():
    from crosspatch.engine.adapter import Adapter, model_device
    from crosspatch.sites.catalog import Axis, Catalog, SiteFamily
    from crosspatch.engine.reach import ModuleOutput

    class MLPAdapter(Adapter):
        name = "iit_mlp"

        def matches(self, model):
            return isinstance(model, MLP)

        def catalog(self, model):
            return Catalog([SiteFamily("hidden", (Axis("dim", H),), ModuleOutput(model, "layers.{layer}"), 2)], "MLP")

        def prepare(self, model, inputs):
            x = inputs["x"] if isinstance(inputs, dict) else inputs
            return {"x": x.to(model_device(model))}

        def forward(self, model, inputs):
            return model(inputs["x"])

    return MLPAdapter()


def encode(a, b):
    return torch.cat([nn.functional.one_hot(a, V), nn.functional.one_hot(b, V)], 1).float()


def all_pairs():
    """Every (base, source) pair of the 25 inputs: base and source (a, b), and the labels."""
    grid = torch.cartesian_prod(torch.arange(V), torch.arange(V), torch.arange(V), torch.arange(V))
    ab, sab = grid[:, :2], grid[:, 2:]
    base, source = encode(ab[:, 0], ab[:, 1]), encode(sab[:, 0], sab[:, 1])
    y_base = (ab[:, 0] + ab[:, 1]) % V
    y_a = (sab[:, 0] + ab[:, 1]) % V  # A from the source
    y_b = (ab[:, 0] + sab[:, 1]) % V  # B from the source
    return base, source, y_base, y_a, y_b


@pytest.fixture(scope="module")
def data():
    return all_pairs()


@pytest.fixture(scope="module")
def strict_model(data):
    base, source, y_base, y_a, y_b = data
    m = cp.wrap(MLP(), mlp_adapter())
    losses = train_iit(m, {SITE_A: y_a, SITE_B: y_b}, base, source, y_base, strict_sites=[NULL],
                       epochs=30, batch_size=125, lr=1e-2, progress=False)
    m.module.eval()
    return m, losses


def test_untrained_model_does_not_hold_a_at_the_site(data):
    base, source, _, y_a, _ = data
    m = cp.wrap(MLP().eval(), mlp_adapter())
    assert interchange_accuracy(m, SITE_A, base, source, y_a) < 0.5


def test_iit_puts_a_at_the_site(data):
    base, source, y_base, y_a, _ = data
    m = cp.wrap(MLP(), mlp_adapter())
    losses = train_iit(m, {SITE_A: y_a}, base, source, y_base, epochs=30, batch_size=125, progress=False)
    m.module.eval()
    assert losses[-1] < losses[0]
    assert interchange_accuracy(m, SITE_A, base, source, y_a) >= 0.9
    assert (m.run(base).output.argmax(-1) == y_base).float().mean() >= 0.95


def test_strict_iit_leaves_other_sites_without_effect(data, strict_model):
    base, source, y_base, y_a, y_b = data
    m, losses = strict_model
    assert interchange_accuracy(m, SITE_A, base, source, y_a) >= 0.9
    assert interchange_accuracy(m, SITE_B, base, source, y_b) >= 0.9
    assert interchange_effect(m, NULL, base, source) <= 0.02
    assert (m.run(base).output.argmax(-1) == y_base).float().mean() >= 0.95


def test_interchange_effect_is_zero_for_identical_inputs(data, strict_model):
    base, _, _, _, _ = data
    m, _ = strict_model
    assert interchange_effect(m, SITE_A, base, base) == 0.0
