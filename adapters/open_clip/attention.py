"""Unfused attention for open_clip: the same parameters, the same outputs, every step reachable.

open_clip's default ``ResidualAttentionBlock`` runs attention inside ``nn.MultiheadAttention``,
which computes the pattern and the heads in one fused kernel: no hook sees a head or a pattern.
Its ``custom`` block uses open_clip's ``Attention``, whose heads reach ``out_proj`` side by side but
whose pattern stays inside ``scaled_dot_product_attention``.

:class:`UnfusedAttention` computes the same function step by step. It has the parameters of the
module it replaces *under the same names* (``in_proj_weight``, ``in_proj_bias``, ``out_proj.*``, and
for the custom block ``ln_q``, ``ln_k``, ``logit_scale``, ``head_scale``, ``ln_inner``), so state dicts
load both ways, and it exposes two things:

* ``pattern``, an identity submodule the attention probabilities ``[batch, head, query, key]`` pass
  through (after the softmax, before dropout);
* ``out_proj``, called as a module on the heads side by side ``[batch, pos, head * d_head]``;
* ``in_proj``, the fused query/key/value projection called as a module on the normalised block
  input (self-attention): ``F.linear`` with ``in_proj_weight`` / ``in_proj_bias``, holding no
  parameters of its own (state dicts are unchanged). ``head_in`` splices each head's columns there.

:func:`unfuse` returns a copy of a model with every block's attention unfused. The adapter does not
need it: while a crosspatch run is under way it swaps each fused module for an unfused twin that
*shares* its parameters and swaps it back when the run ends (see ``adapter.py``).
"""

from __future__ import annotations

import copy
import math
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["UnfusedAttention", "unfuse", "residual_blocks", "is_fused"]


class _InProjection(nn.Module):
    """The owner's fused ``in_proj_weight`` / ``in_proj_bias`` applied as a module (a hook point, with
    ``weight`` ``[3 * d_model, d_model]`` and ``bias`` read from the owner at every access). The owner
    is kept outside the module tree, so it holds no parameters and adds no state-dict keys."""

    def __init__(self, owner: nn.Module):
        super().__init__()
        object.__setattr__(self, "_owner", owner)  # not a child module: no cycle in the module tree

    @property
    def weight(self) -> torch.Tensor:
        return self._owner.in_proj_weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self._owner.in_proj_bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class UnfusedAttention(nn.Module):
    """Multi-head attention with the pattern and the per-head outputs visible.

    Build it from an existing module with :meth:`from_module` (sharing or copying its parameters).
    Called like the module it replaces: ``nn.MultiheadAttention``-style ``(query, key, value,
    need_weights=..., attn_mask=...) -> (out, weights)`` or open_clip ``Attention``-style
    ``(x, attn_mask=...) -> out``.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        qkv_bias: bool = True,
        mha_style: bool = True,
        batch_first: bool = True,
        dropout: float = 0.0,
    ):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.mha_style, self.batch_first, self.dropout = mha_style, batch_first, dropout
        # Registration order follows nn.MultiheadAttention and open_clip's Attention, so that state
        # dicts list the same keys in the same order.
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.register_parameter("in_proj_bias", nn.Parameter(torch.zeros(3 * embed_dim)) if qkv_bias else None)
        # open_clip `Attention` extras (identity / None for nn.MultiheadAttention)
        self.register_parameter("logit_scale", None)  # scaled cosine attention
        self.register_parameter("head_scale", None)
        self.logit_scale_max = math.log(1.0 / 0.01)
        self.ln_q: nn.Module = nn.Identity()
        self.ln_k: nn.Module = nn.Identity()
        self.ln_inner: nn.Module = nn.Identity()
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        self.out_drop: nn.Module = nn.Identity()
        self.pattern = nn.Identity()  # hook point: attention probabilities [batch, head, query, key]
        self.in_proj = _InProjection(self)  # hook point: the fused q/k/v projection (self-attention)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_module(cls, attn: nn.Module, *, share: bool = True) -> "UnfusedAttention":
        """The unfused equivalent of ``attn`` (``nn.MultiheadAttention`` or open_clip ``Attention``).

        With ``share`` the new module holds the *same* parameter and submodule objects (no copy:
        training, ``.to()`` and ``load_state_dict`` on either are seen by both); otherwise copies.
        """
        if isinstance(attn, UnfusedAttention):
            return attn if share else copy.deepcopy(attn)
        src = attn if share else copy.deepcopy(attn)
        if isinstance(src, nn.MultiheadAttention):
            if not src._qkv_same_embed_dim or src.bias_k is not None or src.add_zero_attn:
                raise ValueError(
                    "only self-attention nn.MultiheadAttention without bias_k/bias_v/add_zero_attn can be unfused "
                    "(open_clip's transformer blocks use exactly that)"
                )
            new = cls(src.embed_dim, src.num_heads, qkv_bias=src.in_proj_bias is not None, mha_style=True,
                      batch_first=src.batch_first, dropout=src.dropout)
        elif _is_open_clip_attention(src):
            new = cls(src.in_proj_weight.shape[1], src.num_heads, qkv_bias=src.in_proj_bias is not None,
                      mha_style=False, batch_first=True, dropout=src.attn_drop.p)
            new.scale = src.scale
            new.ln_q, new.ln_k, new.ln_inner = src.ln_q, src.ln_k, src.ln_inner
            new.logit_scale, new.logit_scale_max, new.head_scale = src.logit_scale, src.logit_scale_max, src.head_scale
            new.out_drop = src.out_drop
        else:
            raise TypeError(f"cannot unfuse {type(attn).__name__}; expected nn.MultiheadAttention or open_clip Attention")
        new.in_proj_weight = src.in_proj_weight
        new.in_proj_bias = src.in_proj_bias
        new.out_proj = src.out_proj
        new.train(src.training)
        return new

    def shares(self, attn: nn.Module) -> bool:
        """Whether this module computes with ``attn``'s own parameter objects."""
        return (
            self.in_proj_weight is getattr(attn, "in_proj_weight", None)
            and self.in_proj_bias is getattr(attn, "in_proj_bias", None)
            and self.out_proj is getattr(attn, "out_proj", None)
        )

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, style={'mha' if self.mha_style else 'open_clip'}"

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor | None = None,
        value: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = False,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ):
        transpose = self.mha_style and not self.batch_first
        if transpose:
            query = query.transpose(0, 1)
            key = None if key is None else key.transpose(0, 1)
            value = None if value is None else value.transpose(0, 1)
        self_attention = (key is None or key is query) and (value is None or value is query)
        key = query if key is None else key
        value = key if value is None else value
        n, length, _ = query.shape
        source = key.shape[1]
        heads, d_head = self.num_heads, self.head_dim

        if self_attention:
            in_proj = getattr(self, "in_proj", None)  # None: a module pickled before in_proj existed
            qkv = in_proj(query) if in_proj is not None else F.linear(query, self.in_proj_weight, self.in_proj_bias)
            q, k, v = qkv.chunk(3, dim=-1)
        else:
            w = self.in_proj_weight.chunk(3)
            b = (None, None, None) if self.in_proj_bias is None else self.in_proj_bias.chunk(3)
            q, k, v = F.linear(query, w[0], b[0]), F.linear(key, w[1], b[1]), F.linear(value, w[2], b[2])
        q = q.reshape(n, length, heads, d_head).transpose(1, 2)
        k = k.reshape(n, source, heads, d_head).transpose(1, 2)
        v = v.reshape(n, source, heads, d_head).transpose(1, 2)

        if self.logit_scale is not None:  # scaled cosine attention
            scores = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-1, -2)
            scores = scores * torch.clamp(self.logit_scale, max=self.logit_scale_max).exp()
        else:
            q, k = self.ln_q(q), self.ln_k(k)
            scores = (q * self.scale) @ k.transpose(-1, -2)
        mask = self._mask(attn_mask, key_padding_mask, n, length, source, scores.dtype)
        if mask is not None:
            scores = scores + mask
        if is_causal and mask is None:
            causal = torch.ones(length, source, dtype=torch.bool, device=scores.device).triu(1)
            scores = scores.masked_fill(causal, float("-inf"))
        wide = torch.float32 if scores.dtype in (torch.float16, torch.bfloat16) else scores.dtype
        pattern = scores.softmax(dim=-1, dtype=wide).to(q.dtype)
        pattern = self.pattern(pattern)
        attended = F.dropout(pattern, p=self.dropout, training=self.training) @ v  # [n, head, pos, d_head]
        if self.head_scale is not None:
            attended = attended * self.head_scale
        z = attended.transpose(1, 2).reshape(n, length, heads * d_head)
        out = self.out_drop(self.out_proj(self.ln_inner(z)))
        if not self.mha_style:
            return out
        if transpose:
            out = out.transpose(0, 1)
        weights = None
        if need_weights:
            weights = pattern.mean(dim=1) if average_attn_weights else pattern
        return out, weights

    def _mask(self, attn_mask, key_padding_mask, n, length, source, dtype) -> torch.Tensor | None:
        """An additive float mask broadcastable to ``[n, head, length, source]``."""
        out = None
        if attn_mask is not None:
            m = attn_mask
            if m.dtype == torch.bool:
                m = torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(m, float("-inf"))
            else:
                m = m.to(dtype)
            if m.ndim == 3:  # [n * head, length, source]
                m = m.reshape(n, self.num_heads, length, source)
            elif m.ndim == 2:
                m = m[:length, :source]
            out = m
        if key_padding_mask is not None:
            p = key_padding_mask
            if p.dtype == torch.bool:
                p = torch.zeros(p.shape, dtype=dtype, device=p.device).masked_fill(p, float("-inf"))
            p = p.to(dtype).reshape(n, 1, 1, source)
            out = p if out is None else out + p
        return out


def _is_open_clip_attention(module: nn.Module) -> bool:
    cls = type(module)
    return cls.__name__ == "Attention" and cls.__module__.startswith("open_clip") and hasattr(module, "in_proj_weight")


def is_fused(attn: nn.Module) -> bool:
    """Whether ``attn`` hides its pattern (and, for nn.MultiheadAttention, its heads) from hooks."""
    return isinstance(attn, nn.MultiheadAttention) or _is_open_clip_attention(attn)


def residual_blocks(model: nn.Module) -> Iterator[nn.Module]:
    """Every residual attention block of the towers' transformers (``*.resblocks.<i>``)."""
    for name, module in model.named_modules():
        if name.endswith("resblocks") and isinstance(module, nn.ModuleList):
            yield from module


def unfuse(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """An equivalent model whose transformer blocks compute attention with :class:`UnfusedAttention`.

    Returns a deep copy (``inplace=False``, the default) whose state dict has exactly the keys and
    values of ``model``'s, so weights load into either; outputs agree to float rounding. crosspatch does
    not need this (it unfuses during its own runs only); use it to keep an unfused model around, e.g.
    for other hook-based tools.
    """
    target = model if inplace else copy.deepcopy(model)
    for block in residual_blocks(target):
        attn = getattr(block, "attn", None)
        if attn is not None and is_fused(attn):
            block.attn = UnfusedAttention.from_module(attn, share=True)
    return target
