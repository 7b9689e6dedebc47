"""CD-T's propagation rules over ``(rel, irrel)`` pairs, free of any architecture (:mod:`crosspatch.methods.cdt`).

Each rule maps the two parts of an activation to the two parts of the next one so that their sum is
the model's own output on ``rel + irrel``:

* :func:`affine` (linear layers, projections, the unembedding): ``rel' = W rel + b * s``,
  ``irrel' = W irrel + b * (1 - s)`` with ``s = |W rel| / (|W rel| + |W irrel|)`` elementwise: the bias is
  shared in proportion to the magnitudes of the two parts' images, as in the paper. Where both images are
  0 (a zero row of the weight: BERT's tied unembedding of the padding token) ``s`` is the relevant input's
  share of the two inputs' L1 norms, so no source keeps ``rel'`` at 0 and a source that is everything
  gives it the whole bias.
* :func:`normalize` (LayerNorm, RMSNorm): each part centred on its own mean (LayerNorm), both scaled by
  the *total*'s scale and the weight; the bias shared as in :func:`affine`.
* :func:`activation` (GELU, SiLU, tanh, a gated ``act(gate) * up``): ``irrel' = f(irrel)``,
  ``rel' = f(rel + irrel) - f(irrel)``.
* :func:`attention`: the relevant pattern is ``softmax(q_rel k_rel^T * scale + mask)``, the irrelevant one
  the total pattern minus it; the relevant output is ``P_rel v_rel``, the irrelevant one the total
  ``P v`` minus it (the paper's rule: values are linear, the probabilities come from the decomposed
  query and key).
* :func:`add` (the residual): parts add.

Two properties hold bit for bit, not just to rounding: a part that is exactly zero stays exactly zero
through every rule but the attention pattern (no relevant input gives ``rel' = 0``; a relevant part that
is everything gives ``irrel' = 0``), because each part is computed from its own input and the shares
of a zero part are zero. The sum holds to rounding; where the model computes an op in a narrower
precision than its dtype (transformers' RMSNorm is computed in float32 in a float64 model) the rule
takes the model's own output as the total and gives the difference to the parts in proportion to
their magnitudes (:func:`reconcile`), which also keeps zero parts zero.
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["Pair", "share", "row_share", "reconcile", "affine", "normalize", "activation", "attention", "add"]

Pair = tuple[torch.Tensor, torch.Tensor]  # (rel, irrel), same shape


def share(rel: torch.Tensor, irrel: torch.Tensor, tie: torch.Tensor | float = 0.0) -> torch.Tensor:
    """``|rel| / (|rel| + |irrel|)`` elementwise; ``tie`` where both are 0 (broadcast; 0: it is context)."""
    a, total = rel.abs(), rel.abs() + irrel.abs()
    nonzero = total > 0
    return torch.where(nonzero, a / torch.where(nonzero, total, torch.ones_like(total)), torch.as_tensor(tie, dtype=a.dtype))


def row_share(rel: torch.Tensor, irrel: torch.Tensor) -> torch.Tensor:
    """``[..., 1]``: the relevant part's share of the two parts' L1 norms over the last axis (0 where both are 0)."""
    return share(rel.abs().sum(dim=-1, keepdim=True), irrel.abs().sum(dim=-1, keepdim=True))


def _shared(rel: torch.Tensor, irrel: torch.Tensor, extra: torch.Tensor, tie: torch.Tensor | float = 0.0) -> Pair:
    """``extra`` (a bias, a rounding difference) added to the parts in proportion to their magnitudes, elementwise."""
    s = share(rel, irrel, tie)
    return rel + extra * s, irrel + extra * (1 - s)


def reconcile(pair: Pair, total: torch.Tensor) -> Pair:
    """The parts moved to sum to ``total`` (the model's own output), the difference shared by magnitude."""
    rel, irrel = pair
    return _shared(rel, irrel, total - (rel + irrel), row_share(rel, irrel))


def affine(pair: Pair, part_fn: Callable[[torch.Tensor], torch.Tensor], bias: torch.Tensor | None) -> Pair:
    """``y = part(x) + bias`` with ``part`` linear (a weight without its bias)."""
    rel, irrel = part_fn(pair[0]), part_fn(pair[1])
    # Where both images are 0 (a zero row of the weight) the bias goes by the inputs' norms.
    return (rel, irrel) if bias is None else _shared(rel, irrel, bias, row_share(*pair))


def normalize(pair: Pair, total_fn: Callable[[torch.Tensor], torch.Tensor], scale_fn: Callable[[torch.Tensor], torch.Tensor],
              *, center: bool, weight: torch.Tensor | None, bias: torch.Tensor | None) -> Pair:
    """A norm: ``(x - mean(x)) * scale(x) * weight + bias`` (``center``, LayerNorm) or ``x * scale(x) * weight``
    (RMSNorm). ``scale_fn`` gives the total's scale ``[..., 1]`` as the model computes it; ``total_fn`` is the
    model's norm itself, whose output the parts are reconciled to."""
    rel, irrel = pair
    total = rel + irrel
    scale = scale_fn(total)

    def part(x: torch.Tensor) -> torch.Tensor:
        x = (x - x.mean(dim=-1, keepdim=True) if center else x) * scale.to(x.dtype)
        return x if weight is None else x * weight

    return reconcile(affine(pair, part, bias), total_fn(total))


def activation(fn: Callable[..., torch.Tensor], *pairs: Pair) -> Pair:
    """An elementwise ``fn`` of one or more inputs (a gated MLP: ``fn(gate, up) = act(gate) * up``):
    ``irrel' = fn(irrel, ...)``, ``rel' = fn(rel + irrel, ...) - irrel'``."""
    total = fn(*(r + i for r, i in pairs))
    irrel = fn(*(i for _, i in pairs))
    return total - irrel, irrel


def attention(q: Pair, k: Pair, v: Pair, mask: torch.Tensor | None, scaling: float) -> tuple[Pair, Pair]:
    """Scaled dot-product attention over ``[rows, heads, pos, d]`` parts (keys and values already repeated to
    the query heads). Returns the pattern pair ``[rows, heads, pos, key_pos]`` and the output pair
    ``[rows, heads, pos, d]``. ``mask`` is the model's own additive mask, added to both parts' scores."""

    def pattern(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
        if mask is not None:
            scores = scores + mask[..., : key.shape[-2]]
        wide = torch.float32 if scores.dtype in (torch.float16, torch.bfloat16) else scores.dtype
        return torch.softmax(scores, dim=-1, dtype=wide).to(query.dtype)

    full = pattern(q[0] + q[1], k[0] + k[1])
    rel = pattern(q[0], k[0])
    out = torch.matmul(full, v[0] + v[1])
    out_rel = torch.matmul(rel, v[0])
    return (rel, full - rel), (out_rel, out - out_rel)


def add(a: Pair, b: Pair) -> Pair:
    """The residual: parts add."""
    return a[0] + b[0], a[1] + b[1]
