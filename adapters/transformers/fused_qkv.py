"""The column order of a fused query/key/value projection, found by experiment (for ``head_in``).

A fused projection's ``3 * heads * d_head`` outputs are laid out role-major (``[q | k | v]``, each
``[head, d_head]``: MPT, OpenAI GPT) or head-major (``[head, q/k/v, d_head]``: BLOOM, Persimmon, Falcon).
Names do not say which; what each column does does. Under an assumed order, a nudge to the columns
of one head's value, query or key in the first block must move that head's slice of the output
projection's input (``head_z``) and nothing else, and:

- the value's columns: linearly (twice the nudge moves it twice as far), at every position;
- the query's columns at one position: only that position's row (a query reads only for itself);
- the key's columns at the first position: also later rows in a causal model (they attend to it).

The order under which all of these hold is the projection's; when neither does, ``head_in`` is not
served and the reason says so.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from crosspatch.engine.reach import temporarily

__all__ = ["column_order"]


def _columns(role: int, head: int, n_heads: int, d_head: int, head_major: bool) -> slice:
    start = (head * 3 + role) * d_head if head_major else (role * n_heads + head) * d_head
    return slice(start, start + d_head)


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
                 d_head: int, causal: bool) -> bool | None:
    """True: head-major, False: role-major, None: neither order explains what the columns do."""
    plain = _z(model, inputs, proj, o_proj, None)  # [batch, pos, heads * d_head]
    head = min(1, n_heads - 1)
    gen = torch.Generator().manual_seed(0)
    delta = torch.randn(d_head, generator=gen).to(plain.dtype)

    def moved(z: torch.Tensor) -> torch.Tensor:  # [batch, pos, heads]: which head slices moved
        diff = (z - plain).unflatten(-1, (n_heads, -1)).abs().amax(-1)
        return diff > 1e-6 * max(1.0, plain.abs().max().item())

    for head_major in (False, True):
        def nudge(role: int, scale: float, pos: int | None):
            cols = _columns(role, head, n_heads, d_head, head_major)

            def apply(output: torch.Tensor) -> torch.Tensor:
                where = output[..., cols] if pos is None else output[:, pos, cols]
                where += scale * delta.to(output.device, output.dtype)
                return output
            return apply

        others = [h for h in range(n_heads) if h != head]
        once = _z(model, inputs, proj, o_proj, nudge(2, 1.0, None))
        twice = _z(model, inputs, proj, o_proj, nudge(2, 2.0, None))
        value_ok = (not moved(once)[..., others].any() and bool(moved(once)[..., head].all())
                    and torch.allclose(twice - plain, 2 * (once - plain), atol=1e-5, rtol=1e-3))
        if not value_ok:
            continue
        pos = plain.shape[1] - 1
        query = moved(_z(model, inputs, proj, o_proj, nudge(0, 1.0, pos)))
        query_ok = bool(query[:, pos, head].all()) and not query[:, :pos].any() and not query[..., others].any()
        key = moved(_z(model, inputs, proj, o_proj, nudge(1, 1.0, 0)))
        key_ok = not key[..., others].any() and (not causal or bool(key[:, 1:, head].any()))
        if query_ok and key_ok:
            return head_major
    return None
