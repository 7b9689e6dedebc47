"""Models whose mechanism is known by construction, with their adapters: ground truth for methods.

``SubspaceToy`` keeps two variables ``a`` and ``b`` in known 2-d planes of its ``hidden`` site
(``hidden = R @ [circle(a), circle(b), noise]`` with a random rotation ``R``) and outputs
``(a + b) mod 4``. DAS should find ``span(R[:, 0:2])`` for ``a``; a random rotation should not.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..engine.adapter import Adapter, model_device
from ..sites.catalog import Axis, Catalog, SiteFamily
from ..engine.reach import ModuleOutput

__all__ = ["N_VALUES", "D", "SubspaceToy", "SubspaceAdapter", "subspace_adapter", "subspace_pairs"]

N_VALUES, D = 4, 8


class Embed(nn.Module):
    """[a, b, noise x4] -> hidden = R @ [circle(a), circle(b), noise]: a sits in span(R[:, 0:2])."""

    def __init__(self, rotation: torch.Tensor):
        super().__init__()
        angles = torch.arange(N_VALUES) * 2 * math.pi / N_VALUES
        self.register_buffer("circle", torch.stack([angles.cos(), angles.sin()], 1))
        self.register_buffer("R", rotation)

    def forward(self, x):
        a, b = x[:, 0].long(), x[:, 1].long()
        z = torch.cat([self.circle[a], self.circle[b], x[:, 2:]], dim=1)
        return z @ self.R.T


class Readout(nn.Module):
    """Reads a and b back from their planes and outputs log p((a + b) mod 4)."""

    def __init__(self, embed: Embed, scale: float = 4.0):
        super().__init__()
        self.embed, self.scale = embed, scale

    def forward(self, h):
        z = h @ self.embed.R
        pa = (self.scale * z[:, 0:2] @ self.embed.circle.T).softmax(-1)
        pb = (self.scale * z[:, 2:4] @ self.embed.circle.T).softmax(-1)
        idx = torch.arange(N_VALUES)
        shift = (idx[:, None] - idx[None, :]) % N_VALUES  # shift[c, i] = c - i
        pc = (pa[:, None, :] * pb[:, shift.flatten()].view(-1, N_VALUES, N_VALUES)).sum(-1)
        return pc.clamp_min(1e-9).log()


class SubspaceToy(nn.Module):
    """``(a + b) mod 4`` with ``a`` and ``b`` in known planes of ``hidden``."""

    def __init__(self, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        rotation = torch.linalg.qr(torch.randn(D, D, generator=gen))[0]
        self.hidden = Embed(rotation)
        self.readout = Readout(self.hidden)

    def forward(self, x):
        return self.readout(self.hidden(x))


class SubspaceAdapter(Adapter):
    """One site family, ``hidden`` (axis ``dim``); inputs are ``[n, 2 + noise]`` float tensors."""

    name = "subspace_toy"

    def matches(self, model):
        return isinstance(model, SubspaceToy)

    def catalog(self, model):
        return Catalog([SiteFamily("hidden", (Axis("dim", D),), ModuleOutput(model, "hidden"))], "SubspaceToy")

    def prepare(self, model, inputs):
        return {"x": inputs.to(model_device(model))}

    def forward(self, model, inputs):
        return model(inputs["x"])


def subspace_adapter() -> SubspaceAdapter:
    return SubspaceAdapter()


def subspace_pairs(n: int, seed: int):
    """Base and source inputs, and the high-level model's label after interchanging ``a``."""
    gen = torch.Generator().manual_seed(seed)

    def draw():
        ab = torch.randint(N_VALUES, (n, 2), generator=gen).float()
        return torch.cat([ab, torch.randn(n, D - 4, generator=gen)], 1)

    base, source = draw(), draw()
    labels = (source[:, 0].long() + base[:, 1].long()) % N_VALUES  # high-level model: interchange a
    return base, source, labels
