"""Learned edge masks (edge pruning): the gradient-based alternative to ACDC.

Every edge ``s -> r`` of an :class:`~crosspatch.methods.edges.EdgeGraph` gets a gate ``z`` in
``[0, 1]`` (1 = the edge is kept, 0 = it carries the ablated sender value). The masked forward is
the edge-patching formula of :mod:`crosspatch.methods.edges` with the patch weight ``1 - z``::

    input_r = input_r(this run) + sum_s (1 - z[s -> r]) * (ablated_s - s(this run))

which is differentiable in ``z``. The gates are hard-concrete (Louizos et al., 2018; as in
:class:`~crosspatch.methods.masks.LearnedMask`) or sigmoid; training minimises a faithfulness loss
(by default the KL divergence from the full model, :func:`~crosspatch.metrics.kl_to_clean`) plus
``sparsity`` times the expected fraction of edges kept (Bhaskar et al., 2024, "edge pruning").

:func:`masked_edges_output` is the differentiable masked forward (any ``[k, n_edges]`` stack of
patch weights, row blocks of one forward, gradients flowing into the weights).
:func:`ablated_senders` computes the ablated sender values, including ``"mean_per_position"`` and
``"mean_over_positions"``, for :mod:`~crosspatch.methods.edges` to reuse.
"""

from __future__ import annotations

from typing import Any, Callable, Literal

import numpy as np
import torch
from torch import nn

from ..engine.adapter import repeat_rows
from ..results.metrics import Metric, MetricContext, kl_to_clean
from .edges.graph import EdgeGraph, spread_groups
from .edges.patching import EdgePatcher
from .edges.result import _flat_index, _result
from .pairs import model_metric
from ..trainable.masks import expected_open, kept_gates, relaxed_gates

__all__ = ["learn_edge_masks", "masked_edges_output", "dense_masks", "ablated_senders", "EdgeMaskParams"]



def ablated_senders(
    cache, keys, ablation: Literal["mean_per_position", "mean_over_positions", "mean"]
) -> dict[str, torch.Tensor]:
    """Ablated sender values from a reference run's ``cache`` (``[rows, pos, ...]`` per sender key).

    ``"mean_per_position"`` (= edges.py's ``"mean"``): the mean over rows, one value per position,
    shape ``[1, pos, ...]``. ``"mean_over_positions"``: the mean over rows and positions, broadcast
    to every position (for inputs whose positions do not line up), shape ``[1, pos, ...]``.
    """
    out = {}
    for k in keys:
        v = cache[k]
        wide = v.to(torch.promote_types(v.dtype, torch.float32))
        if ablation in ("mean", "mean_per_position"):
            mean = wide.mean(dim=0, keepdim=True)
        elif ablation == "mean_over_positions":
            mean = wide.mean(dim=(0, 1), keepdim=True).expand(1, *v.shape[1:])
        else:
            raise ValueError(f"ablation must be 'mean_per_position' or 'mean_over_positions', got {ablation!r}")
        out[k] = mean.to(v.dtype).clone()
    return out


def dense_masks(graph: EdgeGraph, masks: torch.Tensor) -> list[torch.Tensor]:
    """Flat ``[k, n_edges]`` weights as one ``[k, n_in, *slots]`` tensor per receiver key (differentiable,
    one scatter instead of a Python loop over edges; a key/value head's weight on every slot of its group)."""
    sizes = [n_in * int(np.prod(slots, dtype=int)) for _, n_in, slots in graph.receiver_keys]
    index = torch.as_tensor(_flat_index(graph), device=masks.device)
    flat = masks.new_zeros(masks.shape[0], sum(sizes))
    flat = flat.index_copy(1, index, masks)
    parts = [part.reshape(masks.shape[0], n_in, *slots) for part, (_, n_in, slots) in zip(flat.split(sizes, dim=1), graph.receiver_keys)]
    return [spread_groups(d, graph.kv_group) if d.ndim == 4 else d for d in parts]


def masked_edges_output(p: EdgePatcher, patch: torch.Tensor, grad: bool = True) -> torch.Tensor:
    """The clean run with edge ``e`` patched by weight ``patch[:, e]`` (``[k, n_edges]``, row blocks),
    differentiable in ``patch``. Same sites and formula as :func:`~crosspatch.methods.edges.patch_edges`."""
    patch = patch.unsqueeze(0) if patch.ndim == 1 else patch
    k = patch.shape[0]
    return p._execute(repeat_rows(p.clean, k), p.bounds(dense_masks(p.graph, patch), k), grad=grad).output


class EdgeMaskParams(nn.Module):
    """One logit per edge; hard-concrete or sigmoid gates (1 = keep the edge)."""

    def __init__(self, n_edges: int, mode: str = "hard_concrete", init: float = 3.0, dtype=torch.float32):
        super().__init__()
        if mode not in ("hard_concrete", "sigmoid"):
            raise ValueError(f"mode must be 'hard_concrete' or 'sigmoid', got {mode!r}")
        self.mode = mode
        self.logits = nn.Parameter(torch.full((n_edges,), float(init), dtype=dtype))
        self.temperature = 1.0

    def gate(self, samples: int = 1) -> torch.Tensor:
        """``[samples, n_edges]`` relaxed gates (training)."""
        gates = relaxed_gates(self.logits, self.mode, self.temperature, (samples, self.logits.shape[0]))
        return gates.expand(samples, -1)

    def expected_l0(self) -> torch.Tensor:
        return expected_open(self.logits, self.mode, self.temperature)

    def kept(self) -> torch.Tensor:
        """The binary mask: the deterministic gate above 1/2."""
        return kept_gates(self.logits, self.mode)


def learn_edge_masks(
    model, clean, corrupt=None, metric: "Metric | Callable | None" = None, *,
    ablation: Literal["resample", "zero", "mean"] = "resample", reference: Any = None,
    graph: EdgeGraph | None = None, sparsity: float = 0.05, steps: int = 200, lr: float = 0.1,
    mode: Literal["hard_concrete", "sigmoid"] = "hard_concrete", init: float = 3.0, samples: int = 1,
    temperature: tuple[float, float] = (1.0, 0.05), seed: int = 0, normalize: bool = True,
):
    """Learn which edges to keep: minimise ``loss(masked run) + sparsity * (expected edges kept / n_edges)``.

    ``metric(output, ctx)`` is the per-row loss to minimise (``ctx.clean`` is the full model's output);
    it defaults to :func:`~crosspatch.metrics.kl_to_clean` at the last position. With ``normalize`` the
    loss is divided by its value with every edge ablated (so ``sparsity`` trades the fraction of edges
    kept against the fraction of the ablation's damage, whatever the metric's scale). ``samples`` gate
    draws per step run as row blocks of one forward. Only the mask logits train.

    Returns an edge Result whose values are ``sigmoid(logit)`` per edge (in ``(0, 1)``, higher = more
    kept; use them as scores for :func:`~crosspatch.methods.circuit_eval.roc`); ``metadata["kept"]`` lists the edges
    whose deterministic gate is above 1/2 and ``metadata["history"]`` the loss per step.
    """
    p = EdgePatcher(model, clean, corrupt, ablation, reference, graph)
    metric = model_metric(p.m, metric if metric is not None else kl_to_clean())  # text answers: the tokenizer
    if p.ablated is not None:  # captured in inference mode; autograd needs ordinary tensors
        p.ablated = {k: v.clone() for k, v in p.ablated.items()}
    g = p.graph
    clean_out = p._execute(p.clean).output.clone()
    dtype = clean_out.dtype if clean_out.dtype == torch.float64 else torch.float32
    params = EdgeMaskParams(len(g), mode, init, dtype).to(clean_out.device)
    optimizer = torch.optim.Adam(params.parameters(), lr=lr)
    ctx = MetricContext(torch.arange(p.n, device=clean_out.device).repeat(samples), clean_out, None)
    frozen = [q for q in p.m.module.parameters() if q.requires_grad]
    for q in frozen:
        q.requires_grad_(False)
    scale = 1.0
    if normalize:
        full = masked_edges_output(p, torch.ones(1, len(g), dtype=dtype, device=clean_out.device), grad=False)
        damage = float(metric(full, MetricContext(torch.arange(p.n, device=clean_out.device), clean_out, None)).double().mean())
        scale = 1.0 / damage if damage > 0 else 1.0
    history = []
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            t0, t1 = temperature
            for step in range(steps):
                params.temperature = t0 * (t1 / t0) ** (step / max(1, steps - 1))
                z = params.gate(samples)
                out = masked_edges_output(p, 1 - z)
                fit = metric(out, ctx).mean() * scale
                loss = fit + sparsity * params.expected_l0() / len(g)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                history.append(loss.detach())
    finally:
        for q in frozen:
            q.requires_grad_(True)
    kept = params.kept().cpu().numpy()
    with torch.no_grad():
        final = float(metric(masked_edges_output(p, (~params.kept()).to(dtype), grad=False),
                             MetricContext(torch.arange(p.n, device=clean_out.device), clean_out, None)).double().mean())
    return _result(p, torch.sigmoid(params.logits.detach().double()), "learn_edge_masks", metric, {
        "ablation": ablation, "sparsity": sparsity, "steps": steps, "lr": lr, "mode": mode, "samples": samples,
        "seed": seed, "normalize": normalize, "loss_scale": scale, "kept": [name for name, k in zip(g.edge_names, kept) if k], "final_metric": final,
        "history": torch.stack(history).double().cpu().tolist() if history else [],
    })
