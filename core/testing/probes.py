"""The interventions the checks write with: :class:`Perturb`, a write no correct reach can ignore, and
:class:`Raise`, which fails inside a forward so the hooks check can see what a raising run leaves behind.

They are test instruments, not part of the engine's catalogue of interventions: no plugin registers
their kinds, and :class:`RaisedOnPurpose` marks the errors they cause.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..engine.interventions import Intervention


class RaisedOnPurpose(RuntimeError):
    """The error the hooks check raises inside a forward."""


@dataclass
class Perturb(Intervention):
    """Adds seeded noise of the activation's own scale: a write no correct reach can ignore."""

    kind: ClassVar[str] = "crosspatch.testing.perturb"
    seed: int = 0

    def apply(self, x, ctx):
        gen = torch.Generator(device=x.device).manual_seed(self.seed)
        noise = torch.randn(x.shape, generator=gen, device=x.device, dtype=torch.float32).to(x.dtype)
        return x + noise * (x.detach().abs().float().mean().to(x.dtype) + 1)


@dataclass
class Raise(Intervention):
    kind: ClassVar[str] = "crosspatch.testing.raise"

    def apply(self, x, ctx):
        raise RaisedOnPurpose("raised on purpose by crosspatch.testing inside a forward")
