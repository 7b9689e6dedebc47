"""DAS: a toy whose variable lives in a known 2-d subspace; DAS finds it, a random rotation does not."""

from __future__ import annotations


import pytest
import torch

import crosspatch as cp
from crosspatch.trainable.das import (
    BoundlessDAS, LowRankRotatedSubspace, RotatedSubspace, iia, principal_angles, train_das,
)
from crosspatch.zoo.toys import D, N_VALUES, SubspaceToy, subspace_adapter, subspace_pairs
from crosspatch.trainable.base import TrainableIntervention, from_dict, load

pairs = subspace_pairs


@pytest.fixture(scope="module")
def toy():
    return cp.wrap(SubspaceToy().eval(), subspace_adapter())


@pytest.fixture(scope="module")
def data():
    return pairs(512, seed=1), pairs(512, seed=2)


@pytest.fixture(scope="module")
def trained(toy, data):
    (base, source, labels), _ = data
    return train_das(toy, "hidden", base, source, labels, k=2, epochs=10, lr=0.05, seed=0, progress=False)


def test_toy_model_is_what_it_claims(toy, data):
    (base, _, _), _ = data
    out = toy.run(base).output
    assert (out.argmax(-1) == (base[:, 0].long() + base[:, 1].long()) % N_VALUES).float().mean() == 1.0


def test_das_finds_the_known_subspace(toy, data, trained):
    _, (base, source, labels) = data
    score = iia(toy, "hidden", trained, base, source, labels)
    true = toy.module.hidden.R[:, 0:2]
    angles = principal_angles(trained.basis(), true)
    assert score >= 0.95
    assert angles.max() < 5.0, angles
    assert trained.history[-1] < trained.history[0]


def test_random_rotation_does_not(toy, data):
    _, (base, source, labels) = data
    random = RotatedSubspace(D, k=2, seed=123)
    assert iia(toy, "hidden", random, base, source, labels) < 0.6


def test_model_is_left_untouched(toy, data, trained):
    assert all(p.requires_grad for p in toy.module.parameters())
    assert all(p.grad is None for p in toy.module.parameters())


def test_low_rank_variant(toy, data):
    (base, source, labels), (tb, ts, tl) = data
    das = train_das(toy, "hidden", base, source, labels, variant="low_rank", k=2, epochs=10, lr=0.05, progress=False)
    assert isinstance(das, LowRankRotatedSubspace) and das.basis().shape == (D, 2)
    assert iia(toy, "hidden", das, tb, ts, tl) >= 0.95
    assert principal_angles(das.basis(), toy.module.hidden.R[:, 0:2]).max() < 5.0


def test_boundless_learns_the_size(toy, data):
    (base, source, labels), (tb, ts, tl) = data
    das = train_das(toy, "hidden", base, source, labels, variant="boundless", epochs=25, lr=0.05,
                    temperature=(1.0, 0.05), size_penalty=0.5, progress=False)
    assert isinstance(das, BoundlessDAS)
    assert das.size == 2, das.mask()
    assert iia(toy, "hidden", das, tb, ts, tl) >= 0.95
    assert principal_angles(das.basis(), toy.module.hidden.R[:, 0:2]).max() < 5.0


def test_gradients_flow_through_the_engine(toy, data):
    (base, source, _), _ = data
    das = RotatedSubspace(D, k=2, source=source[:8])
    out = toy.run(base[:8], {"hidden": das}, grad=True).output
    out.sum().backward()
    grads = [p.grad for p in das.parameters()]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_full_interchange_equals_patch(toy, data):
    (base, source, _), _ = data
    das = RotatedSubspace(D, k=D, source=source[:8])
    a = toy.run(base[:8], {"hidden": das}).output
    b = toy.run(base[:8], {"hidden": cp.Patch(source[:8])}).output
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_save_load_round_trip(tmp_path, toy, data, trained):
    _, (base, source, labels) = data
    folder = trained.save(tmp_path / "das")
    assert (folder / "config.json").is_file() and (folder / "weights.safetensors").is_file()
    again = load(folder, device="cpu")
    assert isinstance(again, RotatedSubspace) and again.config() == trained.config()
    torch.testing.assert_close(again.basis(), trained.basis())
    assert TrainableIntervention.load(folder).k == 2
    assert iia(toy, "hidden", again, base, source, labels) == iia(toy, "hidden", trained, base, source, labels)


@pytest.mark.parametrize("cls", [RotatedSubspace, LowRankRotatedSubspace, BoundlessDAS])
def test_to_dict_from_dict(cls):
    one = cls(D, seed=5)
    data = one.to_dict()
    assert data["kind"] == cls.kind and "state" in data
    two = from_dict(data)
    assert type(two) is cls and two.config() == one.config()
    for (k1, v1), (k2, v2) in zip(one.state_dict().items(), two.state_dict().items()):
        assert k1 == k2
        torch.testing.assert_close(v1, v2)


def test_registered_through_the_plugin_registry():
    """The `trainable` entry point registers the DAS interventions, so dicts round-trip by kind."""
    from crosspatch.engine.interventions import from_dict as intervention_from_dict
    from crosspatch.plugins.registry import get_registry, reset_registry

    reset_registry()
    try:
        registered = get_registry().interventions()
        assert {"das_rotation", "das_low_rank", "das_boundless", "learned_mask"} <= set(registered)
        one = RotatedSubspace(D, k=3, seed=1)
        two = intervention_from_dict(one.to_dict())
        assert isinstance(two, RotatedSubspace) and two.k == 3
        torch.testing.assert_close(two.basis(), one.basis())
    finally:
        reset_registry()


def test_wrong_dim_is_reported(toy, data):
    (base, source, _), _ = data
    with pytest.raises(cp.SiteError, match="built for 5 dims"):
        toy.run(base[:4], {"hidden": RotatedSubspace(5, k=1, source=source[:4])})
