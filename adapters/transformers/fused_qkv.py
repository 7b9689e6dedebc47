"""The column order of a fused query/key/value projection, found by experiment (for ``head_in``).

A fused projection holds ``heads`` query heads and ``kv_heads`` key and value heads, each ``d_head``
wide (``kv_heads == heads`` without grouped-query attention; 1 under multi-query attention). Its columns
are laid out role-major (``[q | k | v]``, the queries ``[head, d_head]``, then the keys and the values
``[kv_head, d_head]``: MPT, OpenAI GPT, Phi-3, GPT-BigCode's multi-query and Falcon's multi-query
``c_attn`` / ``query_key_value``) or grouped (per key/value head, the query heads it serves, then its key
and its value: ``[kv_head, group + 2, d_head]``; with one query head per key/value head that is
``[head, q/k/v, d_head]``: BLOOM, Persimmon, GPT-NeoX, GPT-BigCode without multi-query, Falcon's new
decoder architecture). Names do not say which; what each column does does. Under an assumed order, a
nudge to the columns of one head's value, query or key in the first block must move the slices of the
output projection's input (``head_z``) of the query heads that read it and nothing else, and:

- a key/value head's value columns: linearly (twice the nudge moves it twice as far), at every position;
- a query head's columns at one position: only that position's row (a query reads only for itself);
- a key/value head's key columns at the first position: also later rows in a causal model (they attend to it).

Checked for two query heads and two key/value heads (the first and the last of each, where there are
more). With one key/value head both orders are the same. The order under which all of these hold is the
projection's; when neither does, ``head_in`` is not served and the reason says so.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from crosspatch.engine.reach import temporarily

__all__ = ["column_order", "columns"]


def columns(role: int, head: int, n_heads: int, d_head: int, head_major: bool, kv_heads: int | None = None) -> slice:
    """The columns of query head ``head`` (role 0) or of key/value head ``head`` (roles 1, 2) in a fused
    projection of ``n_heads`` query and ``kv_heads`` (default ``n_heads``) key/value heads."""
    kv = n_heads if kv_heads is None else kv_heads
    group = n_heads // kv
    if head_major:  # [kv_head, group + 2, d_head]: the group's queries, its key, its value
        block = (head // group) * (group + 2) + head % group if role == 0 else head * (group + 2) + group + role - 1
    else:  # [q heads | k heads | v heads]
        block = head if role == 0 else n_heads + (role - 1) * kv + head
    return slice(block * d_head, (block + 1) * d_head)



def _z(model: nn.Module, inputs: dict[str, Any], proj: nn.Module, o_proj: nn.Module, nudge) -> torch.Tensor:
    """The output projection's input with ``nudge(output)`` applied to the fused projection's output."""
    seen: list[torch.Tensor] = []
    with temporarily() as changes, torch.no_grad():
        changes.forward_pre_hook(o_proj, lambda module, args: seen.append(args[0].detach().clone()))
        if nudge is not None:
            changes.forward_hook(proj, lambda module, args, output: nudge(output.clone()))
        model(**inputs)
    return seen[0]


def column_order(model: nn.Module, inputs: dict[str, Any], proj: nn.Module, o_proj: nn.Module, n_heads: int,
                 d_head: int, causal: bool, kv_heads: int | None = None) -> bool | None:
    """True: grouped / head-major, False: role-major, None: neither order explains what the columns do."""
    kv = n_heads if kv_heads is None else kv_heads
    group = n_heads // kv
    plain = _z(model, inputs, proj, o_proj, None)  # [batch, pos, heads * d_head]
    gen = torch.Generator().manual_seed(0)
    delta = torch.randn(d_head, generator=gen).to(plain.dtype)
    queries = sorted({min(1, n_heads - 1), n_heads - 1})
    kv_tested = sorted({0, kv - 1})

    def moved(z: torch.Tensor) -> torch.Tensor:  # [batch, pos, heads]: which head slices moved
        diff = (z - plain).unflatten(-1, (n_heads, -1)).abs().amax(-1)
        return diff > 1e-6 * max(1.0, plain.abs().max().item())

    def fits(head_major: bool) -> bool:
        def nudge(role: int, head: int, scale: float, pos: int | None):
            cols = columns(role, head, n_heads, d_head, head_major, kv)

            def apply(output: torch.Tensor) -> torch.Tensor:
                where = output[..., cols] if pos is None else output[:, pos, cols]
                where += scale * delta.to(output.device, output.dtype)
                return output
            return apply

        z = lambda role, head, scale, pos: _z(model, inputs, proj, o_proj, nudge(role, head, scale, pos))  # noqa: E731
        last = plain.shape[1] - 1
        for j in kv_tested:
            readers = list(range(j * group, (j + 1) * group))
            others = [h for h in range(n_heads) if h not in readers]
            once, twice = z(2, j, 1.0, None), z(2, j, 2.0, None)
            if (moved(once)[..., others].any() or not bool(moved(once)[..., readers].all())
                    or not torch.allclose(twice - plain, 2 * (once - plain), atol=1e-5, rtol=1e-3)):
                return False
            key = moved(z(1, j, 1.0, 0))
            if key[..., others].any() or (causal and not bool(key[:, 1:, readers].any())):
                return False
        for h in queries:
            others = [o for o in range(n_heads) if o != h]
            query = moved(z(0, h, 1.0, last))
            if not bool(query[:, last, h].all()) or query[:, :last].any() or query[..., others].any():
                return False
        return True

    for head_major in (False, True):
        if fits(head_major):
            return head_major
    return None
