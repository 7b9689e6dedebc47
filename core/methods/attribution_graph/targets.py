"""What an attribution graph attributes: logits (demeaned), logit differences, or any direction at a site.

Every target is a direction ``v`` read at one position of one site: its value in a run is
``site[pos] . v``. A token's logit is read demeaned over the vocabulary (``v = e_t - 1/V``), as the
reference does, so a shift common to every logit is not attributed; a logit difference is
``e_a - e_b``. ``weight`` is how much the target counts in influence (a token's probability for the
default targets, chosen until their cumulative probability reaches 0.95, at most 10).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Target", "logit_target", "logit_diff", "direction_target", "top_logit_targets"]


@dataclass(frozen=True)
class Target:
    """A direction ``direction`` read at position ``pos`` of ``site``; ``token`` when it is a logit."""

    name: str
    site: str
    pos: int
    direction: torch.Tensor
    weight: float = 1.0
    token: int | None = None
    probability: float | None = None

    def value(self, activation: torch.Tensor) -> torch.Tensor:
        """``[rows]``: the target read from a captured ``[rows, pos, d]`` activation."""
        return activation[:, self.pos].to(self.direction.dtype) @ self.direction.to(activation.device)


def logit_target(token: int, vocab: int, *, pos: int = -1, weight: float = 1.0, name: str | None = None,
                 probability: float | None = None, dtype: torch.dtype = torch.float32) -> Target:
    """The demeaned logit of ``token`` at ``pos``."""
    v = torch.full((vocab,), -1.0 / vocab, dtype=dtype)
    v[token] += 1.0
    return Target(name or f"logit {token}", "logits", pos, v, weight, token, probability)


def logit_diff(a: int, b: int, vocab: int, *, pos: int = -1, weight: float = 1.0,
               dtype: torch.dtype = torch.float32) -> Target:
    """``logit[a] - logit[b]`` at ``pos``."""
    v = torch.zeros(vocab, dtype=dtype)
    v[a], v[b] = 1.0, -1.0
    return Target(f"logit {a} - logit {b}", "logits", pos, v, weight)


def direction_target(site: str, pos: int, direction: torch.Tensor, *, weight: float = 1.0,
                     name: str | None = None) -> Target:
    """Any direction at any captured site (``resid_post.1``, ``mlp_out.0`` ...)."""
    return Target(name or f"{site}[{pos}] direction", site, pos, direction.detach(), weight)


def top_logit_targets(logits: torch.Tensor, *, desired_probability: float = 0.95, max_targets: int = 10,
                      pos: int = -1) -> list[Target]:
    """The most probable tokens at ``pos`` of ``logits`` ``[pos, vocab]`` until their cumulative probability
    reaches ``desired_probability`` (at most ``max_targets``), each weighted by its probability."""
    probs = torch.softmax(logits[pos].double(), -1)
    top = probs.sort(descending=True)
    n = int(torch.searchsorted(top.values.cumsum(0), torch.tensor(desired_probability, dtype=probs.dtype))) + 1
    n = max(1, min(n, max_targets, probs.numel()))
    vocab = logits.shape[-1]
    return [logit_target(int(t), vocab, pos=pos, weight=float(p), probability=float(p), dtype=logits.dtype)
            for t, p in zip(top.indices[:n], top.values[:n])]
