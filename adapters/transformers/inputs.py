"""Receiver-input sites of pre-LN residual transformers: what each head, each MLP and the unembedding read.

``head_in.l``  ``[batch, pos, qkv=3, head, dim]``  the residual head ``h``'s query (``qkv=0``), key (1)
    or value (2) projection reads, *before* the block's input norm. Captured, every slot holds the
    block input (``resid_pre.l``). Written, each (role, head) slot is normalised with the norm's own
    parameters and projected on its own, and that head's columns of the projection output are
    replaced; slots equal to the block input keep the model's own output bit for bit.
``mlp_in.l``   ``[batch, pos, dim]``  the MLP's residual input before its norm (``resid_mid.l``);
    writing it changes what the MLP reads, not the residual passed on.
``logits_in``  ``[batch, pos, dim]``  the final norm's input.

These are the receivers of an edge graph (:mod:`crosspatch.methods.edges`). Supported layouts:
separate ``q_proj`` / ``k_proj`` / ``v_proj`` (the Llama family) and one fused projection (GPT-2's
``attn.c_attn``, Conv1D), its columns role-major or grouped per key/value head (:mod:`.fused_qkv`), with as
many key/value heads as query heads or fewer (Phi-3's ``qkv_proj``, GPT-BigCode's multi-query ``c_attn``,
Falcon's ``query_key_value``).
With grouped-query attention a key/value head ``j`` serves the ``groups`` query heads
``j * groups .. (j + 1) * groups - 1``, and its key (value) input is the mean of their key (value)
slots: ``x + mean_h (slot_h - x)``. So the group's slots ``head_in.l[qkv=1,head=a:b]`` are that key/value
head's input (writing them all writes it; a hand hook on its rows of ``k_proj`` is the same patch), each
slot's gradient is ``1/groups`` of the key/value head's, and a first-order credit of the key/value head
is the sum over its query heads' slots (``HeadIn.kv_heads`` says how many there are).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from crosspatch.sites.catalog import Axis, SiteFamily
from crosspatch.engine.offload import reads_weights
from crosspatch.engine.reach import Callback, Handle, ModuleInput, aliases, installing, slot_sink, submodule

from .slot_grad import rms_gamma, slot_gradient

__all__ = ["InputLayout", "HeadIn", "input_families", "LAYOUTS"]


@dataclass(frozen=True)
class InputLayout:
    ln_in: str | None  # the block's input norm (relative to the block); None: q/k/v read the block input itself
    ln_mlp: str | None  # the norm in front of the MLP (relative to the block); None: no mlp_in site
    ln_final: str | None  # the final norm (relative to the base model); None: no logits_in site
    qkv: tuple[str, ...]  # one fused projection (q, k, v side by side) or three
    # A fused projection's columns are grouped per key/value head ([kv_head, its query heads + k + v, d_head]:
    # [head, q/k/v, d_head] without grouped-query attention, GPT-NeoX), not role-major ([q heads | k heads | v heads]).
    head_major: bool = False
    reader: str | None = None  # without ln_in: the module whose input ``hidden_states`` the projections read
    kv_heads: int | None = None  # a fused projection's key/value heads (fewer under GQA / MQA); None: as many as query heads


LAYOUTS: dict[str, InputLayout] = {
    "gpt2": InputLayout("ln_1", "ln_2", "ln_f", ("attn.c_attn",)),
    **{
        name: InputLayout(
            "input_layernorm", "post_attention_layernorm", "norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
        )
        for name in ("llama", "mistral", "qwen2")
    },
    # Parallel residual (the default) has no point between attention and MLP: head_in only (see input_families).
    "gpt_neox": InputLayout(
        "input_layernorm", "post_attention_layernorm", "final_layer_norm", ("attention.query_key_value",), head_major=True
    ),
    # Post-LN encoders: the residual is normalised after each sum, so only head_in (no norm before q/k/v).
    **{
        name: InputLayout(
            None, None, None, ("attention.self.query", "attention.self.key", "attention.self.value"), reader="attention.self"
        )
        for name in ("bert", "roberta")
    },
}


def _norm(module: nn.Module | None, x: torch.Tensor) -> torch.Tensor:
    """The norm applied functionally with the module's own parameters (its hooks do not fire); None: ``x``."""
    if module is None:
        return x
    if isinstance(module, nn.LayerNorm):
        return F.layer_norm(x, module.normalized_shape, module.weight, module.bias, module.eps)
    gamma = rms_gamma(module)
    if gamma is None:
        raise TypeError(f"head_in cannot recompute the norm {type(module).__name__}")
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return gamma * h.to(dtype)


class HeadIn:
    """``[batch, pos, 3, head, d_model]``: every head's query / key / value input before the input norm."""

    def __init__(self, root: nn.Module, block: str, layout: InputLayout, n_heads: int, conv1d: bool):
        self.root, self.block, self.layout, self.n_heads, self.conv1d = root, block, layout, n_heads, conv1d

    @property
    def kv_heads(self) -> int:
        """Key/value heads per layer: ``n_heads`` unless attention is grouped-query (read off layer 0's
        projections); the edge methods and AtP*'s query/key fix read it to report key/value heads."""
        if len(self.layout.qkv) == 1:
            return self.layout.kv_heads or self.n_heads
        q, k = (submodule(self.root, f"{self.block}.{p}", 0) for p in self.layout.qkv[:2])
        k_out = k.weight.shape[1] if self.conv1d else k.weight.shape[0]
        return _heads(k_out, self.n_heads, q, self.conv1d, 1)

    def install(self, layer: int | None, callback: Callback) -> list[Handle]:
        n_heads, conv1d, head_major = self.n_heads, self.conv1d, self.layout.head_major
        kv_heads = self.layout.kv_heads or n_heads  # a fused projection's; separate ones are read off their widths
        ln = submodule(self.root, f"{self.block}.{self.layout.ln_in}", layer) if self.layout.ln_in else None
        reader = ln if ln is not None else submodule(self.root, f"{self.block}.{self.layout.reader}", layer)
        projs = [submodule(self.root, f"{self.block}.{p}", layer) for p in self.layout.qkv]
        stash: dict[str, torch.Tensor | None] = {}

        def before_norm(module, args, kwargs):
            x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            value = x[:, :, None, None, :].expand(*x.shape[:2], 3, n_heads, x.shape[-1])
            new = callback(value)
            stash["x"], stash["new"], stash["read"] = x, new, new is not None and aliases(new, value)
            if new is None or not (torch.is_grad_enabled() and x.requires_grad):
                return None
            # Written, the projections' outputs reach x only through the slots (slot_gradient gives each its
            # own gradient): the norm reads x cut from the graph, so x's gradient is not computed twice and
            # then cancelled. Values and parameter gradients are unchanged.
            if "hidden_states" in kwargs:
                return args, {**kwargs, "hidden_states": x.detach()}
            return (x.detach(), *args[1:]), kwargs

        def splice(roles: tuple[int, ...]):
            def hook(module, args, output):
                new = stash.get("new")
                if new is None:
                    return None
                x = stash["x"].to(output.device)
                weight = module.weight if conv1d else module.weight.T  # [d_model, out]
                parts = _parts(weight, output, module.bias, roles, n_heads, kv_heads, projs[0], conv1d, head_major)
                grad = torch.is_grad_enabled()
                # Unchanged slots keep the module's numbers (and its parameter gradients); in grad mode each
                # also gets its own input gradient from a zero-valued term (no norm or projection per slot).
                sink = slot_sink(new) if stash["read"] else None
                values, written = [], False
                for part in parts:
                    slots = new[:, :, part.first : part.first + part.roles].to(output.device)
                    if part.group > 1:  # a key/value head reads the mean of its query heads' slots; unchanged slots add 0
                        slots = x[:, :, None, None, :] + (slots - x[:, :, None, None, :]).unflatten(3, (part.heads, part.group)).mean(4)
                    keep = (slot_gradient(slots, x, ln, part.w, part.orig, part.bias, sink, (part.first, part.group), carry=True)
                            if grad else part.orig)
                    # One check per part and layer (a host sync on accelerators), none for the value handed back
                    # as it was: a pure read (a gradient tap, an identity write) recomputes nothing.
                    x_slots = x[:, :, None, None, :].expand_as(slots)
                    if stash["read"] or _same_bits(slots, x_slots):
                        values.append(keep)
                        continue
                    changed = (slots != x_slots).any(dim=-1, keepdim=True)
                    rec = torch.einsum("bprhd,drhe->bprhe", _norm(ln, slots), part.w)
                    if part.bias is not None:
                        rec = rec + part.bias
                    values.append(torch.where(changed, rec.to(part.orig.dtype), keep))
                    written = True
                if not (grad or written):
                    return None
                return _as_output(values, output, head_major, n_heads)

            return hook

        role_sets = [(0, 1, 2)] if len(projs) == 1 else [(0,), (1,), (2,)]
        with installing() as changes:
            changes.forward_pre_hook(reader, before_norm, with_kwargs=True)
            for p, r in zip(projs, role_sets):
                changes.forward_hook(p, reads_weights(splice(r), *([ln] if ln is not None else [])))
            return changes.handles


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` (same shape) hold the same bits, compared eight bytes at a time when both
    can be viewed so (half the element compares for float32, a quarter for half dtypes).

    Stricter than ``==`` only for ``-0.0`` against ``0.0`` (which then takes the writing path, where it
    counts as unchanged) and looser only for a NaN met as itself: either way a slot found equal holds ``x``.
    """
    if a.dtype == b.dtype and a.element_size() <= 8 and a.device == b.device:
        try:
            return torch.equal(a.view(torch.int64), b.view(torch.int64))
        except RuntimeError:  # last dim not contiguous or not a whole number of int64s
            pass
    return torch.equal(a, b)


@dataclass(frozen=True)
class _Part:
    """Roles ``first .. first + roles - 1`` of one projection, ``heads`` heads each, as views ``w [d, R, heads, e]``,
    ``orig [b, p, R, heads, e]`` and ``bias [R, heads, e]``; a head serves ``group`` query heads' slots."""

    first: int
    roles: int
    heads: int
    group: int
    w: torch.Tensor
    orig: torch.Tensor
    bias: torch.Tensor | None


def _parts(weight, output, bias, roles: tuple[int, ...], n_heads: int, kv_heads: int, q_proj: nn.Module, conv1d: bool,
           head_major: bool) -> list[_Part]:
    """The roles of one projection whose heads are alike: one part for a separate projection or a fused one with as
    many key/value heads as query heads; a fused one under grouped-query attention is its queries and its keys
    and values (``kv_heads`` each)."""
    if len(roles) == 1:
        heads = _heads(weight.shape[1], n_heads, q_proj, conv1d, 1)
        w, orig, b = _by_role(weight, output, bias, 1, heads, weight.shape[1] // heads, False)
        return [_Part(roles[0], 1, heads, n_heads // heads, w, orig, b)]
    if kv_heads == n_heads:
        w, orig, b = _by_role(weight, output, bias, 3, n_heads, weight.shape[1] // (3 * n_heads), head_major)
        return [_Part(0, 3, n_heads, 1, w, orig, b)]
    e = weight.shape[1] // (n_heads + 2 * kv_heads)
    group = n_heads // kv_heads
    d, lead = weight.shape[0], output.shape[:-1]
    if head_major:  # [kv_head, group + 2, e]: the group's queries, then its key and value
        w = weight.reshape(d, kv_heads, group + 2, e)
        o = output.reshape(*lead, kv_heads, group + 2, e)
        bb = None if bias is None else bias.reshape(kv_heads, group + 2, e)
        q = (w[:, :, :group].reshape(d, 1, n_heads, e), o[..., :group, :].reshape(*lead, 1, n_heads, e),
             None if bb is None else bb[:, :group].reshape(1, n_heads, e))
        kv = (w[:, :, group:].transpose(1, 2), o[..., group:, :].transpose(-3, -2),
              None if bb is None else bb[:, group:].transpose(0, 1))
    else:  # [q heads | k heads | v heads]
        split = n_heads * e
        q = (weight[:, :split].reshape(d, 1, n_heads, e), output[..., :split].reshape(*lead, 1, n_heads, e),
             None if bias is None else bias[:split].reshape(1, n_heads, e))
        kv = (weight[:, split:].reshape(d, 2, kv_heads, e), output[..., split:].reshape(*lead, 2, kv_heads, e),
              None if bias is None else bias[split:].reshape(2, kv_heads, e))
    return [_Part(0, 1, n_heads, 1, *q), _Part(1, 2, kv_heads, group, *kv)]


def _by_role(weight, output, bias, n_roles: int, heads: int, d_head: int, head_major: bool):
    """The projection's weight ``[d, R, heads, e]``, output ``[b, p, R, heads, e]`` and bias ``[R, heads, e]``
    (views) whatever the column order of a fused projection."""
    if head_major:  # columns [head, role, d_head]
        w = weight.reshape(weight.shape[0], heads, n_roles, d_head).transpose(1, 2)
        orig = output.reshape(*output.shape[:2], heads, n_roles, d_head).transpose(2, 3)
        b = None if bias is None else bias.reshape(heads, n_roles, d_head).transpose(0, 1)
        return w, orig, b
    w = weight.reshape(weight.shape[0], n_roles, heads, d_head)
    orig = output.reshape(*output.shape[:2], n_roles, heads, d_head)
    return w, orig, None if bias is None else bias.reshape(n_roles, heads, d_head)


def _as_output(values: list[torch.Tensor], output: torch.Tensor, head_major: bool, n_heads: int) -> torch.Tensor:
    """The parts' values ``[b, p, R, heads, e]`` back in the projection's own column order."""
    if len(values) == 1:
        value = values[0]
        return (value.transpose(2, 3) if head_major and value.shape[2] == 3 else value).reshape(output.shape)
    q, kv = values  # [b, p, 1, H, e] and [b, p, 2, K, e] of a fused projection under grouped-query attention
    b, p = output.shape[:2]
    if head_major:
        kv_heads, e = kv.shape[3], kv.shape[4]
        q = q.reshape(b, p, kv_heads, n_heads // kv_heads, e)
        return torch.cat([q, kv.transpose(2, 3)], dim=3).reshape(output.shape)
    return torch.cat([q.reshape(b, p, -1), kv.reshape(b, p, -1)], dim=-1).reshape(output.shape)


def _heads(n_out: int, n_heads: int, q_proj: nn.Module, conv1d: bool, n_roles: int) -> int:
    """Heads in one role's ``n_out`` outputs: ``n_heads`` for queries, the key/value heads under GQA."""
    if n_roles == 3:
        return n_heads
    q_out = q_proj.weight.shape[1] if conv1d else q_proj.weight.shape[0]
    return n_out // (q_out // n_heads)


def input_families(base: nn.Module, arch, layout: InputLayout | None, block: str, n_heads: int, d_model: int) -> list[SiteFamily]:
    """``head_in``, ``mlp_in`` and ``logits_in`` for a model with a receiver layout, else ``[]``.

    ``arch`` is the adapter's :class:`Architecture`, ``block`` its ``"<layers>.{layer}"`` path from ``base``.
    """
    if layout is None:
        return []
    n_layers = len(submodule(base, arch.layers, None))
    pos, dim = Axis("pos"), Axis("dim", d_model)
    where = "before the input norm" if layout.ln_in else "the block input (no norm in front)"
    head_in = SiteFamily(
        "head_in",
        (pos, Axis("qkv", 3), Axis("head", n_heads), dim),
        HeadIn(base, block, layout, n_heads, arch.conv1d),
        n_layers,
        f"residual each head's query/key/value reads, {where}",
    )
    if arch.resid_mid != "sum" or layout.ln_mlp is None or layout.ln_final is None:
        return [head_in]  # parallel residual or post-LN: no residual-sum receivers for an edge graph
    return [
        head_in,
        SiteFamily(
            "mlp_in", (pos, dim), ModuleInput(base, f"{block}.{layout.ln_mlp}", name=None), n_layers,
            "residual the MLP reads, before its norm",
        ),
        SiteFamily("logits_in", (pos, dim), ModuleInput(base, layout.ln_final, name=None), doc="final norm's input"),
    ]
