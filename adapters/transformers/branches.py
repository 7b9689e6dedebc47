"""Which module writes each branch of a residual block (attention, MLP) into the residual stream, read
off one probe forward (:mod:`.probe`).

A branch's write is its module's output, or the output of a chain of modules each taking the one
before it whole (a sandwich norm, DINOv2's layer scale). A branch module handed the residual stream
as an argument may add it to its own output (BLOOM's attention and MLP, the ``output`` module of a
ViT-style MLP handed ``input_tensor``, an attention that norms its input inside and adds it back): its
write is then its output minus that argument. The reading under which block input + attention write + MLP write is the block
output is the block's; the plain one is tried first.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from .probe import Flow, same

__all__ = ["Branches", "PostNorms", "branches", "is_norm", "post_norms"]


def is_norm(module: nn.Module) -> bool:
    """A torch norm, or a module named as one that holds no linear layer (``RobertaPreLayerNormOutput`` does)."""
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm)):
        return True
    return "norm" in type(module).__name__.lower() and not any(isinstance(m, nn.Linear) for m in module.modules())


@dataclass(frozen=True)
class Branches:
    """Where each branch's write comes from, and its value and the stream after attention in the probe."""

    attn: str  # the module whose output is the attention's write (or holds it, with attn_residual)
    mlp: str
    attn_residual: str | None  # the argument handing ``attn`` the residual it adds; None: plain
    mlp_residual: str | None
    attn_write: torch.Tensor
    mlp_write: torch.Tensor
    mid: torch.Tensor  # block input + attention write
    # A layer scale the block multiplies a branch's output by inline (BEiT's lambda_1 and lambda_2): the
    # name of the block's own parameter; None: none.
    attn_scale: str | None = None
    mlp_scale: str | None = None


def branches(flow: Flow, first: str, children: dict[str, nn.Module], attn: str, mlp: str,
             scales: dict[str, torch.Tensor] | None = None) -> Branches | None:
    """The branches of block ``first`` (its children by name), or None when no reading adds up. ``scales``:
    the block's own parameters shaped like one residual vector, tried as inline layer scales when no
    plain reading adds up."""
    x, y = flow.inputs.get(first), flow.outputs.get(first)
    for inside in (False, True):
        found = _reading(flow, first, children, attn, mlp, x, inside)
        if found is not None and same(x + found.attn_write + found.mlp_write, y):
            return found
    found = _reading(flow, first, children, attn, mlp, x, False)
    if found is None or not scales:
        return None
    options = [None, *scales]
    for a in options:
        for m in options:
            if a is None and m is None:
                continue
            attn_w = found.attn_write * scales[a] if a else found.attn_write
            mlp_w = found.mlp_write * scales[m] if m else found.mlp_write
            if same(x + attn_w + mlp_w, y):
                return replace(found, attn_write=attn_w, mlp_write=mlp_w, mid=x + attn_w, attn_scale=a, mlp_scale=m)
    return None


def _reading(flow: Flow, first: str, children: dict[str, nn.Module], attn: str, mlp: str, x: torch.Tensor,
             inside: bool) -> Branches | None:
    out = lambda name: flow.outputs.get(f"{first}.{name}")  # noqa: E731
    attn_res = _handed(flow, f"{first}.{attn}", x) if inside else None
    if attn_res is not None:
        attn_w, a, mid = attn, out(attn) - x, out(attn)
    else:
        attn_w = _chain(flow, first, children, attn, (attn, mlp))
        a = out(attn_w)
        mid = x + a
    mlp_res = _handed(flow, f"{first}.{mlp}", mid) if inside else None
    if inside and attn_res is None and mlp_res is None:
        return None  # the same as the plain reading
    if mlp_res is not None:
        mlp_w, m = mlp, out(mlp) - mid
    else:
        mlp_w = _chain(flow, first, children, mlp, (attn, mlp))
        m = out(mlp_w)
    if a is None or m is None or a.shape != x.shape or m.shape != x.shape:
        return None
    return Branches(attn_w, mlp_w, attn_res, mlp_res, a, m, mid)


def _handed(flow: Flow, name: str, value: torch.Tensor) -> str | None:
    """The argument of module ``name`` that was handed ``value``: one beside its first input, or the first
    itself (a branch that norms its input inside and adds it back: RoBERTa-PreLayerNorm's attention)."""
    found = next((arg for arg, t in flow.beside.get(name, {}).items() if same(t, value, atol=0)), None)
    if found is None and same(flow.inputs.get(name), value, atol=0):
        found = flow.first.get(name)
    return found


def _chain(flow: Flow, first: str, children: dict[str, nn.Module], branch: str, skip: tuple[str, ...]) -> str:
    """The last of the modules with weights (or norms) each taking the previous one's output whole, and
    nothing else of its shape, and giving one of its shape, from ``branch``'s output on: a sandwich norm, a
    layer scale (not a module that mixes in the residual too); ``branch`` when none does."""
    name, seen = branch, set(skip)
    while True:
        value = flow.outputs.get(f"{first}.{name}")
        following = next((n for n, m in children.items() if n not in seen and (is_norm(m) or _weighted(m))
                          and same(flow.inputs.get(f"{first}.{n}"), value, atol=0) and _shaped(flow, f"{first}.{n}", value)
                          and not flow.beside.get(f"{first}.{n}")), None)
        if following is None:
            return name
        name = following
        seen.add(following)


def _shaped(flow: Flow, name: str, value: torch.Tensor) -> bool:
    """Whether module ``name`` gave an output shaped like ``value`` (a scale or norm, not a projection)."""
    out = flow.outputs.get(name)
    return out is not None and out.shape == value.shape


def _weighted(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


@dataclass(frozen=True)
class PostNorms:
    """A post-norm block: ``mid = mid_norm(x + attn)``, ``y = out_norm(mid + mlp)`` (BART's decoder, DistilBERT)."""

    attn: str
    mlp: str
    mid_norm: str
    out_norm: str


def post_norms(flow: Flow, first: str, children: dict[str, nn.Module], attn: str, mlp: str) -> PostNorms | None:
    """The norms of block ``first`` that take each sum of the residual and a branch's write, when the block
    output is the second's output; None when the block is not laid out so."""
    x, y = flow.inputs.get(first), flow.outputs.get(first)
    out = lambda name: flow.outputs.get(f"{first}.{name}")  # noqa: E731
    a, m = out(attn), out(mlp)
    if x is None or a is None or m is None or a.shape != x.shape or m.shape != x.shape:
        return None
    norms = [n for n, module in children.items() if is_norm(module)]
    mid = next((n for n in norms if same(flow.inputs.get(f"{first}.{n}"), x + a)), None)
    if mid is None:
        return None
    end = next((n for n in norms if n != mid and same(flow.inputs.get(f"{first}.{n}"), out(mid) + m)
                and same(out(n), y, atol=0)), None)
    return None if end is None else PostNorms(attn, mlp, mid, end)
