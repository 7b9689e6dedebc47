"""A model with a known primary, negative and backup head, and its closed-form head roles.

:class:`RoleToy` is a 2-layer, 2-head, attention-free residual model with hand-set weights and the six
site families of an edge graph, so :func:`~crosspatch.methods.head_roles.head_roles` (and every edge method)
runs on it unchanged. Float64; the residual has 6 dimensions, every component writes its own::

    embed          x0 = val(token)                   (val(t) = 1 + t / vocab)
    head 0.0  P    reads x0, writes x1 = x0           the primary: the logits read x1
    head 0.1       reads x0, writes x4 = x0           inert: nothing reads x4
    head 1.0  N    reads x1, writes x2 = -NU * x1     negative: it cancels part of P's write
    head 1.1  B    reads x0, x1, writes x3 = BETA * (x0 - x1)
                                                      backup: 0 while P copies x0, BETA * (x0 - x1) without it
    mlps           write 0
    logits         [x1 + x2 + x3, 0] per position

Heads are linear maps of their value input at the same position (query and key inputs read and ignored).
With ``s`` and ``c`` the clean and corrupt ``val`` at the read position (resample ablation), the gap is
``(1 - NU)(s - c)`` and, as fractions of it (:func:`closed_form_roles`):

=========  ===============================  =========================  ==========================
head       total effect                     direct effect              compensation, P ablated
=========  ===============================  =========================  ==========================
P   0.0    ``(1 - NU - BETA) / (1 - NU)``    ``1 / (1 - NU)``           (ablated)
    0.1    0                                0                          0
N   1.0    ``-NU / (1 - NU)``               ``-NU / (1 - NU)``          ``+NU / (1 - NU)``
B   1.1    0                                0                          ``BETA / (1 - NU)``
=========  ===============================  =========================  ==========================

N's compensation is positive too: with P gone it reads the corrupt ``x1``, so it no longer cancels the clean
value; but its direct effect with P ablated is 0, while B's is ``BETA / (1 - NU)``: B takes over, N stops
pushing back. ``head_roles`` calls a head backup only when both rise above its threshold, so every threshold
in ``(0, BETA / (1 - NU))`` (here 2/3) and below ``NU / (1 - NU)`` (1/3, for N to count as negative) gives the
same three roles.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from .ground_truth import N_HEADS, ResidualToy, ResidualToyAdapter, _Fan, _Heads
from .ground_truth import _Embed as ResidualEmbed

__all__ = ["RoleToy", "RoleToyAdapter", "role_toy", "closed_form_roles", "PRIMARY", "NEGATIVE", "BACKUP", "INERT",
           "NU", "BETA"]

D_MODEL, N_LAYERS = 6, 2  # two heads a layer, as ground_truth's toy
NU, BETA = 0.25, 0.5
PRIMARY, INERT, NEGATIVE, BACKUP = "head_out.0[head=0]", "head_out.0[head=1]", "head_out.1[head=0]", "head_out.1[head=1]"


class _Zero(nn.Module):
    def forward(self, x):
        return torch.zeros_like(x)


class _Block(nn.Module):
    def __init__(self, layer: int):
        super().__init__()
        maps = torch.zeros(N_HEADS, D_MODEL, D_MODEL, dtype=torch.float64)
        if layer == 0:
            maps[0, 0, 1] = 1.0  # P: x1 = x0
            maps[1, 0, 4] = 1.0  # inert: x4 = x0
        else:
            maps[0, 1, 2] = -NU  # N: x2 = -NU x1
            maps[1, 0, 3], maps[1, 1, 3] = BETA, -BETA  # B: x3 = BETA (x0 - x1)
        self.fan, self.heads, self.mlp_in, self.mlp = _Fan(), _Heads(maps), nn.Identity(), _Zero()

    def forward(self, resid):
        resid = resid + self.heads(self.fan(resid)).sum(dim=2)
        return resid + self.mlp(self.mlp_in(resid))


class _Embed(ResidualEmbed):
    """``x0 = val(token)`` as the residual toy's embedding, in a residual of D_MODEL dimensions."""

    def forward(self, ids):
        x = super().forward(ids)
        return torch.nn.functional.pad(x, (0, D_MODEL - x.shape[-1]))


class RoleToy(ResidualToy):
    """Token ids ``[batch, pos]`` -> two logits per position, float64 (see the module docstring): the residual
    toy's layout with other blocks and readout."""

    d_model = D_MODEL

    def __init__(self, vocab: int = 50):
        super().__init__(vocab)
        self.embed = _Embed(vocab)
        self.blocks = nn.ModuleList([_Block(layer) for layer in range(N_LAYERS)])

    def forward(self, ids):
        x = self.logits_in(functools.reduce(lambda resid, block: block(resid), self.blocks, self.embed(ids)))
        logit = x[..., 1] + x[..., 2] + x[..., 3]
        return torch.stack([logit, torch.zeros_like(logit)], dim=-1)


class RoleToyAdapter(ResidualToyAdapter):
    """The edge-graph families of :class:`RoleToy`, read where :class:`ResidualToyAdapter` reads them (its
    catalog, at the role toy's width)."""

    name = "role_toy"

    def matches(self, model):
        return isinstance(model, RoleToy)


def role_toy(vocab: int = 50):
    """The wrapped model."""
    from ..engine.model import WrappedModel

    return WrappedModel(RoleToy(vocab).eval(), RoleToyAdapter())


def closed_form_roles() -> dict[str, dict[str, float]]:
    """Per head, ``total``, ``direct`` and ``compensation`` (P ablated; None for P) as fractions of the gap,
    by the formulas of the module docstring; they do not depend on the prompts (all are multiples of ``s - c``)."""
    g = 1 - NU
    return {
        PRIMARY: {"total": (1 - NU - BETA) / g, "direct": 1 / g, "compensation": None},
        INERT: {"total": 0.0, "direct": 0.0, "compensation": 0.0},
        NEGATIVE: {"total": -NU / g, "direct": -NU / g, "compensation": NU / g},
        BACKUP: {"total": 0.0, "direct": 0.0, "compensation": BETA / g},
    }
