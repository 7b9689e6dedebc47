"""Learned masks: on a toy where only known hidden units matter, the mask keeps exactly those."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import crosspatch as cp
from crosspatch.trainable.masks import LearnedMask, masked_output, train_masks
from crosspatch.trainable.base import from_dict, load

HIDDEN, IMPORTANT = 16, (2, 5, 11)


class MaskToy(nn.Module):
    """x [n, 6] -> relu(Linear) [n, 16] -> Linear -> 3 classes; only units 2, 5, 11 reach the output."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.inp = nn.Linear(6, HIDDEN)
        self.out = nn.Linear(HIDDEN, 3)
        with torch.no_grad():
            self.inp.weight.copy_(torch.randn(HIDDEN, 6, generator=gen))
            self.inp.bias.fill_(0.5)
            w = torch.zeros(3, HIDDEN)
            w[:, list(IMPORTANT)] = 2.0 * torch.randn(3, len(IMPORTANT), generator=gen)
            self.out.weight.copy_(w)
            self.out.bias.zero_()
        self.act = nn.ReLU()

    def forward(self, x):
        return self.out(self.act(self.inp(x)))


def mask_adapter():
    from crosspatch.engine.adapter import Adapter, model_device
    from crosspatch.sites.catalog import Axis, Catalog, SiteFamily
    from crosspatch.engine.reach import ModuleOutput

    class MaskAdapter(Adapter):
        name = "mask_toy"

        def matches(self, model):
            return isinstance(model, MaskToy)

        def catalog(self, model):
            return Catalog(
                [
                    SiteFamily("input", (Axis("dim", 6),), ModuleOutput(model, "inp")),
                    SiteFamily("hidden", (Axis("neuron", HIDDEN),), ModuleOutput(model, "act")),
                ],
                "MaskToy",
            )

        def prepare(self, model, inputs):
            return {"x": inputs.to(model_device(model))}

        def forward(self, model, inputs):
            return model(inputs["x"])

    return MaskAdapter()


@pytest.fixture(scope="module")
def toy():
    return cp.wrap(MaskToy().eval(), mask_adapter())


@pytest.fixture(scope="module")
def x():
    return torch.randn(512, 6, generator=torch.Generator().manual_seed(1))


def agreement(toy, masks, x, source=None):
    clean = toy.run(x).output.argmax(-1)
    return (masked_output(toy, masks, x, source).argmax(-1) == clean).float().mean().item()


@pytest.mark.parametrize("mode", ["hard_concrete", "sigmoid"])
def test_mask_recovers_the_units_that_matter(toy, x, mode):
    masks = train_masks(toy, "hidden", x, mode=mode, sparsity=0.5, epochs=40, lr=0.1, progress=False)
    mask = masks["hidden"]
    kept = torch.nonzero(mask.kept()).flatten().tolist()
    assert kept == list(IMPORTANT), kept
    assert agreement(toy, masks, x) >= 0.97
    assert mask.history[-1] < mask.history[0]


def test_mean_ablation_and_whole_sites(toy, x):
    # which whole site matters: the hidden layer is needed, and masking it with its mean breaks the output
    masks = train_masks(toy, ["hidden"], x, per="site", ablation="mean", source=x, sparsity=0.05, epochs=20,
                        progress=False)
    assert masks["hidden"].kept().tolist() == [True]
    assert agreement(toy, masks, x, source=x) > 0.95


def test_mask_only_trains_the_mask(toy, x):
    before = {k: v.clone() for k, v in toy.module.state_dict().items()}
    train_masks(toy, "hidden", x[:64], epochs=2, progress=False)
    for k, v in toy.module.state_dict().items():
        torch.testing.assert_close(v, before[k])
    assert all(p.requires_grad and p.grad is None for p in toy.module.parameters())


def test_fixed_mask_equals_zero_ablation(toy, x):
    mask = LearnedMask(HIDDEN, mode="sigmoid", init=-50.0).eval()
    a = toy.run(x[:8], {"hidden": mask}).output
    b = toy.run(x[:8], {"hidden": cp.Zero()}).output
    torch.testing.assert_close(a, b)
    keep = LearnedMask(HIDDEN, init=50.0).eval()
    torch.testing.assert_close(toy.run(x[:8], {"hidden": keep}).output, toy.run(x[:8]).output)


def test_bad_shape_is_reported(toy, x):
    with pytest.raises(cp.SiteError, match="does not broadcast"):
        toy.run(x[:4], {"hidden": LearnedMask(5).eval()})


def test_save_load_and_dict(tmp_path, toy, x):
    mask = LearnedMask(HIDDEN, mode="sigmoid", ablation="mean", temperature=0.3)
    with torch.no_grad():
        mask.logits.copy_(torch.linspace(-2, 2, HIDDEN))
    again = load(mask.save(tmp_path / "mask"))
    assert again.config() == mask.config()
    torch.testing.assert_close(again.logits, mask.logits)
    assert torch.equal(again.kept(), mask.kept())
    three = from_dict(mask.to_dict())
    assert isinstance(three, LearnedMask) and float(three.temperature) == pytest.approx(0.3)
