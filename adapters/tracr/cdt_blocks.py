"""CD-T's forward over ``(rel, irrel)`` pairs for :class:`TracrTransformer` (:class:`crosspatch.methods.cdt.DecomposedForward`).

tracr's forward has no norm, no mask and no causal structure: per block, attention with Q/K/V/O biases
(``softmax(q k^T / sqrt(key_size))``), then ``relu(x W1 + b1) W2 + b2``, each added to the residual; the output
is the residual times the unembedding (no bias). Written with :mod:`crosspatch.methods.cdt_rules` over the
model's own weights.

Nodes, laid out as the tracr catalog's families: ``embed``; per block ``resid_pre``, ``head_in`` (a target: the
residual every head's q / k / v reads), ``head_q`` / ``head_k`` / ``head_v`` (targets, ``[pos, head, key_size]``),
``attn_pattern`` (a target), ``head_out`` (each head's write, a source: tracr's catalog has no ``head_z``),
``attn_out``, ``resid_mid``, ``mlp_in`` (a target), ``mlp_act``, ``mlp_out``, ``resid_post``; then ``logits_in``
(a target) and ``logits``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from crosspatch.engine.adapter import Inputs
from crosspatch.methods.cdt import NodeFamily, Visit
from crosspatch.methods.cdt_rules import Pair, activation, add, affine, attention

from .model import TracrTransformer

__all__ = ["TracrDecomposition"]


@dataclass
class _Prepared:
    rows: int
    residuals: list[torch.Tensor]  # each block's input [rows, pos, d]


class TracrDecomposition:
    """The decomposed forward of one :class:`TracrTransformer`."""

    def __init__(self, model: TracrTransformer):
        self.model = model
        n, pos_dim = model.n_layers, ("pos", "dim")
        head = ("pos", "head", "d_head")
        # (name, axes, may hold a source): per block, in forward order
        block = [("resid_pre", pos_dim, True), ("head_in", ("pos", "qkv", "head", "dim"), False)]
        block += [(f"head_{r}", head, False) for r in "qkv"]
        block += [("attn_pattern", ("head", "pos", "key_pos"), False), ("head_out", ("pos", "head", "dim"), True)]
        block += [(name, pos_dim, True) for name in ("attn_out", "resid_mid")]
        block += [("mlp_in", pos_dim, False), ("mlp_act", ("pos", "neuron"), True)]
        block += [(name, pos_dim, True) for name in ("mlp_out", "resid_post")]
        self.families = (
            NodeFamily("embed", pos_dim),
            *(NodeFamily(name, axes, n, source=source) for name, axes, source in block),
            NodeFamily("logits_in", pos_dim, source=False),
            NodeFamily("logits", ("pos", "vocab"), source=False),
        )

    def prepare(self, inputs: Inputs) -> _Prepared:
        """Every block's input, from one forward of the model's own modules."""
        ids = inputs["input_ids"]
        residuals = []
        with torch.inference_mode():
            x = self.model.embed(ids)
            for block in self.model.blocks:
                residuals.append(x)
                x = block(x)
        return _Prepared(ids.shape[0], residuals)

    def run(self, prepared: _Prepared, visit: Visit, *, repeat: int = 1, start: int = 0) -> None:
        x = prepared.residuals[start]
        x = x.repeat(repeat, 1, 1) if repeat > 1 else x
        pair: Pair = (torch.zeros_like(x), x)
        if start == 0:
            pair = visit("embed", pair)
        for layer in range(start, self.model.n_layers):
            pair = self._block(layer, pair, visit)
        visit("logits_in", pair)
        visit("logits", affine(pair, lambda t: t @ self.model.unembed.matrix, None))

    def _block(self, layer: int, pair: Pair, visit: Visit) -> Pair:
        attn, mlp = self.model.blocks[layer].attn, self.model.blocks[layer].mlp
        pair = visit(f"resid_pre.{layer}", pair)
        visit(f"head_in.{layer}", tuple(t[:, :, None, None, :].expand(*t.shape[:2], 3, attn.n_heads, t.shape[-1]) for t in pair))
        # q, k, v of every head with its bias, as one linear map to [rows, pos, head * key_size]; then [rows, head, pos, key_size]
        q, k, v = (
            tuple(t.unflatten(-1, (attn.n_heads, -1)).transpose(1, 2) for t in
                  affine(pair, lambda t, r=r: torch.einsum("bpd,hde->bphe", t, attn.w_qkv[r]).flatten(-2), attn.b_qkv[r].flatten()))
            for r in range(3)
        )
        for name, part in (("head_q", q), ("head_k", k), ("head_v", v)):
            visit(f"{name}.{layer}", tuple(t.transpose(1, 2) for t in part))
        pattern, z = attention(q, k, v, None, 1 / math.sqrt(attn.key_size))
        visit(f"attn_pattern.{layer}", pattern)
        heads = visit(f"head_out.{layer}", tuple(torch.einsum("bhpe,hed->bphd", t, attn.w_o) for t in z))
        flat = tuple(t.flatten(-2) for t in heads)  # [rows, pos, head * d]: the bias shared by the heads' sum
        out = visit(f"attn_out.{layer}", affine(flat, lambda t: t.unflatten(-1, (attn.n_heads, -1)).sum(dim=-2), attn.b_o))
        mid = visit(f"resid_mid.{layer}", add(pair, out))
        visit(f"mlp_in.{layer}", mid)
        act = visit(f"mlp_act.{layer}", activation(torch.relu, affine(mid, lambda t: t @ mlp.w1, mlp.b1)))
        out = visit(f"mlp_out.{layer}", affine(act, lambda t: t @ mlp.w2, mlp.b2))
        return visit(f"resid_post.{layer}", add(mid, out))

