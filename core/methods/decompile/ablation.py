"""Optimal ablation (Li & Janson 2024) and the node pruning built on it.

Optimal ablation replaces a component's activation by the constant that minimises the task loss
(here one constant per position: ``[T, *site axes]``), fitted by gradient descent from the mean
activation. A component matters when even its best constant hurts: its *optimal-ablation score*
is ``loss(constant) - loss(clean)``, a lower bound on what any constant ablation costs.

:func:`prune_nodes` ablates components greedily, least important first, keeping a component
whenever replacing it (together with those already pruned) by its optimal constant drops the
accuracy below ``min_accuracy``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from ...engine.interventions import Fn
from ...progress import progress_bar

__all__ = ["AblationFit", "Batch", "PrunedGraph", "ablated_run", "optimal_ablation", "prune_nodes"]

logger = logging.getLogger(__name__)

LossFn = Callable[[torch.Tensor, Any], torch.Tensor]


@dataclass
class Batch:
    """Inputs of one length and what the loss compares the output with."""

    inputs: Any
    target: Any


@dataclass
class AblationFit:
    """The optimal constant of one site and the losses around it (means over the batches)."""

    site: str
    constant: torch.Tensor
    loss: float
    mean_loss: float
    clean_loss: float
    steps: int

    @property
    def score(self) -> float:
        """What the best constant costs: ``loss - clean_loss``."""
        return self.loss - self.clean_loss


def _constant_fn(c: torch.Tensor) -> Fn:
    return Fn(lambda x: c[: x.shape[1]].unsqueeze(0).expand_as(x).to(x.dtype))


def ablated_run(m: Any, inputs: Any, constants: dict[str, torch.Tensor], grad: bool = False) -> torch.Tensor:
    """The output with each site in ``constants`` replaced by its constant (``[T, *axes]``)."""
    return m.run(inputs, {s: _constant_fn(c) for s, c in constants.items()}, grad=grad).output


def _mean_activation(m: Any, batches: Sequence[Batch], site: str) -> torch.Tensor:
    total: torch.Tensor | None = None
    count: torch.Tensor | None = None
    for b in batches:
        x = m.run(b.inputs, capture=[site]).cache[site].detach().double()
        T = x.shape[1]
        if total is None:
            T_max = max(_length(bb.inputs) for bb in batches)
            total = torch.zeros((T_max, *x.shape[2:]), dtype=torch.float64, device=x.device)
            count = torch.zeros(T_max, dtype=torch.float64, device=x.device)
        total[:T] += x.sum(dim=0)
        count[:T] += x.shape[0]
    assert total is not None and count is not None
    return (total / count.clamp(min=1).view(-1, *[1] * (total.ndim - 1))).float()


def _length(inputs: Any) -> int:
    ids = inputs["input_ids"] if isinstance(inputs, dict) else inputs
    return int(torch.as_tensor(ids).shape[-1])


def _loss(m: Any, batches: Sequence[Batch], loss_fn: LossFn, constants: dict[str, torch.Tensor], grad: bool = False) -> torch.Tensor:
    weights = [float(_rows(b.inputs)) for b in batches]
    total = sum(w * loss_fn(ablated_run(m, b.inputs, constants, grad=grad), b.target) for w, b in zip(weights, batches))
    return total / sum(weights)


def _rows(inputs: Any) -> int:
    ids = inputs["input_ids"] if isinstance(inputs, dict) else inputs
    return int(torch.as_tensor(ids).shape[0])


def optimal_ablation(m: Any, batches: Sequence[Batch], site: str, loss_fn: LossFn, *, steps: int = 60,
                     lr: float = 0.05, fixed: dict[str, torch.Tensor] | None = None) -> AblationFit:
    """Fit the constant at ``site`` minimising the mean of ``loss_fn(output, target)`` over ``batches``.

    Adam from the mean activation; the best constant seen is returned, so the fitted loss is never
    above mean ablation's. ``fixed``: other sites held at given constants during the fit.
    """
    fixed = dict(fixed or {})
    with torch.no_grad():
        clean = float(_loss(m, batches, loss_fn, fixed))
        mean = _mean_activation(m, batches, site)
        mean_loss = float(_loss(m, batches, loss_fn, {**fixed, site: mean}))
    best_c, best_loss = mean.clone(), mean_loss
    if abs(mean_loss - clean) <= 1e-9 or steps <= 0:
        return AblationFit(site, best_c, best_loss, mean_loss, clean, 0)
    c = mean.clone().requires_grad_(True)
    opt = torch.optim.Adam([c], lr=lr)
    for _ in range(steps):
        loss = _loss(m, batches, loss_fn, {**fixed, site: c}, grad=True)
        value = float(loss.detach())
        if value < best_loss:
            best_c, best_loss = c.detach().clone(), value
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        final = float(_loss(m, batches, loss_fn, {**fixed, site: c.detach()}))
    if final < best_loss:
        best_c, best_loss = c.detach().clone(), final
    return AblationFit(site, best_c, best_loss, mean_loss, clean, steps)


@dataclass
class PrunedGraph:
    """Which components survive pruning under optimal ablation, with their scores and constants."""

    nodes: list[str]
    kept: list[str]
    scores: dict[str, float]
    mean_scores: dict[str, float]
    constants: dict[str, torch.Tensor] = field(repr=False, default_factory=dict)
    clean_loss: float = 0.0
    pruned_loss: float = 0.0
    pruned_accuracy: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        return {"nodes": self.nodes, "kept": self.kept, "scores": self.scores, "mean_scores": self.mean_scores,
                "clean_loss": self.clean_loss, "pruned_loss": self.pruned_loss, "pruned_accuracy": self.pruned_accuracy}


def prune_nodes(m: Any, batches: Sequence[Batch], nodes: Sequence[str], loss_fn: LossFn,
                accuracy_fn: Callable[[torch.Tensor, Any], float], *, min_accuracy: float = 1.0, steps: int = 60,
                lr: float = 0.05, progress: bool | None = None) -> PrunedGraph:
    """Greedy pruning of ``nodes`` (sites such as ``head_out.1[head=0]``, ``mlp_out.2``) under optimal ablation."""
    fits = {n: optimal_ablation(m, batches, n, loss_fn, steps=steps, lr=lr)
            for n in progress_bar(list(nodes), progress, desc="optimal ablation")}
    order = sorted(nodes, key=lambda n: fits[n].score)
    pruned: dict[str, torch.Tensor] = {}

    def accuracy(constants: dict[str, torch.Tensor]) -> float:
        with torch.no_grad():
            rows = [(_rows(b.inputs), accuracy_fn(ablated_run(m, b.inputs, constants), b.target)) for b in batches]
        return sum(n * a for n, a in rows) / max(sum(n for n, _ in rows), 1)

    for n in order:
        trial = {**pruned, n: fits[n].constant}
        if accuracy(trial) >= min_accuracy:
            pruned = trial
    kept = [n for n in nodes if n not in pruned]
    with torch.no_grad():
        pruned_loss = float(_loss(m, batches, loss_fn, pruned))
    clean = fits[nodes[0]].clean_loss if nodes else 0.0
    logger.info("pruning kept %d of %d components", len(kept), len(nodes))
    return PrunedGraph(list(nodes), kept, {n: fits[n].score for n in nodes},
                       {n: fits[n].mean_loss - fits[n].clean_loss for n in nodes}, pruned, clean, pruned_loss,
                       accuracy(pruned))
