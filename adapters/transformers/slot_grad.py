"""Per-slot gradients of a head's query / key / value input without recomputing the norm per slot.

A ``head_in`` slot that holds the block input ``x`` unchanged contributes exactly the module's own
output; only its *gradient* must be its own: ``J_norm(x)^T W_slot^T g_slot`` (``W_slot`` the slot's
head columns of the projection, ``g_slot`` the gradient at them). :func:`slot_gradient` adds a
zero-valued term whose backward produces that gradient for every slot at once, from the norm's
statistics of ``x`` (one ``[.., d]`` pass) instead of a norm and a projection per slot in the forward.
It gives ``x`` no gradient: the module must read ``x`` cut from the graph (``HeadIn`` does), so that ``x``
is reached through the slots alone, each path once, and no gradient is computed only to be cancelled.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from crosspatch.engine.reach import SlotSink

__all__ = ["slot_gradient", "rms_gamma"]

_OFFSET: "weakref.WeakKeyDictionary[nn.Module, bool | None]" = weakref.WeakKeyDictionary()


def rms_gamma(norm: nn.Module) -> "torch.Tensor | None":
    """The scale an RMS norm multiplies ``x / rms(x)`` by: its ``weight``, or ``1 + weight`` for norms that
    store the offset (Gemma's); None when the module computes neither. Found once per module by running
    its own forward (no hooks) on a probe and comparing with both forms."""
    weight = getattr(norm, "weight", None)
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    if not isinstance(weight, torch.Tensor) or not isinstance(eps, float):
        return None
    if norm not in _OFFSET:
        with torch.no_grad():
            gen = torch.Generator().manual_seed(0)
            x = torch.randn(2, weight.shape[-1], generator=gen).to(device=weight.device, dtype=weight.dtype)
            y = norm.forward(x).double()
            h = x.double()
            xhat = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
            w = weight.detach().double()
            err = {False: (w * xhat - y).abs().max(), True: ((1 + w) * xhat - y).abs().max()}
            best = min(err, key=lambda k: err[k])
            tol = 1e-6 if weight.dtype == torch.float64 else 1e-2 if weight.dtype in (torch.float16, torch.bfloat16) else 1e-4
            _OFFSET[norm] = best if err[best] <= tol * (1 + y.abs().max()) else None
    offset = _OFFSET[norm]
    if offset is None:
        return None
    return 1 + weight if offset else weight


def _stats(norm: nn.Module | None, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]:
    """``(xhat, rstd, gamma, kind)`` of a LayerNorm (``"layer"``), an RMSNorm (``"rms"``) or no norm
    (``None``: ``"none"``, the projection reads ``x`` itself) at ``x``, in float32 or wider."""
    h = x.detach().to(_wide(x.dtype))
    if norm is None:
        return h, torch.ones_like(h[..., :1]), torch.ones(h.shape[-1], dtype=h.dtype, device=h.device), "none"
    if isinstance(norm, nn.LayerNorm):
        xhat, _, rstd = torch.native_layer_norm(h, h.shape[-1:], None, None, norm.eps)  # one fused pass
        gamma = norm.weight if norm.weight is not None else torch.ones(h.shape[-1], device=h.device)
        return xhat, rstd, gamma.detach().to(h.dtype), "layer"
    gamma = rms_gamma(norm)
    if gamma is None:
        raise TypeError(f"head_in cannot differentiate through the norm {type(norm).__name__} (LayerNorm or RMSNorm expected)")
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    rstd = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return h * rstd, rstd, gamma.detach().to(h.dtype), "rms"


def _wide(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class _SlotGradient(torch.autograd.Function):
    """Value 0 (or ``carry`` itself, its gradient passed through); the backward turns ``g [b, p, R, H, e]`` into every slot's gradient ``[b, p, R, H, d]``.

    With ``u = rstd * gamma * W_slot g`` the norm's backward is ``u - mean_d(u) - xhat * mean_d(u * xhat)``
    (no mean term for an RMSNorm; just ``u`` with no norm). ``mean_d(u)`` is linear in ``g``: it is gone
    from ``wc``, ``gamma * W`` centred over ``d`` (for a LayerNorm), and ``mean_d(u * xhat)`` comes from
    ``yhat = (gamma * xhat) W``, the projection's own output without biases. One batched matmul writes
    the ``[slot, b*p, d]`` result, in that (slot-major) order, and one in-place pass corrects it.
    """

    @staticmethod
    def forward(ctx, slots, carry, xhat, rstd, gamma, w, output, bias, beta, kind: str, sink, where: tuple[int, int]):
        ctx.save_for_backward(xhat, rstd, gamma, w, output, bias, beta)
        ctx.kind, ctx.sink, ctx.where = kind, sink, where
        ctx.dtype, ctx.carry = slots.dtype, carry is not None
        if carry is not None:  # the projection's output itself, its gradient passed through unchanged
            return carry
        return slots.new_zeros(*slots.shape[:-1], w.shape[-1])

    @staticmethod
    def backward(ctx, g):
        xhat, rstd, gamma, w, output, bias, beta = ctx.saved_tensors
        wc, yhat = _weights(w, gamma, output, bias, beta, ctx.kind)  # made here: held by no layer between the passes
        b, p, r, h, e = g.shape
        d, rows, slots = wc.shape[0], b * p, r * h
        rest = (g if ctx.carry else None,) + (None,) * 10
        gs = g.to(xhat.dtype).reshape(rows, slots, e) * rstd.reshape(rows, 1, 1)
        proj = (gs * yhat.reshape(rows, slots, e)).sum(-1) / d if ctx.kind != "none" else None  # [rows, slot]
        if ctx.sink is not None:
            return (_to_sink(ctx, gs, proj, xhat, wc, (b, p, r, h, d)),) + rest
        u = torch.bmm(gs.transpose(0, 1), wc.reshape(d, slots, e).permute(1, 2, 0))  # [slot, rows, d]
        if proj is not None:
            u.addcmul_(xhat.reshape(1, rows, d), proj.T[..., None], value=-1)
        grad = u.to(ctx.dtype).view(r, h, b, p, d).permute(2, 3, 0, 1, 4)
        return (grad,) + rest


def _weights(w: torch.Tensor, gamma: torch.Tensor, output: torch.Tensor, bias: "torch.Tensor | None",
             beta: "torch.Tensor | None", kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(wc, yhat)``: ``wc = gamma * W`` (``[d, R, H, e]``, contiguous), centred over ``d`` for a LayerNorm, and
    ``yhat = (gamma * xhat) W``, the projection's ``output = (gamma * xhat + beta) W + bias`` less its constant.
    ``mean_d(gamma W)`` and ``beta W`` come from one matmul over ``W`` and ``wc`` from one more pass."""
    w, output = w.to(gamma.dtype), output.to(gamma.dtype)  # float32 or wider (_stats)
    bias, beta = (None if t is None else t.to(gamma.dtype) for t in (bias, beta))
    d = w.shape[0]
    coef = ([gamma / d] if kind == "layer" else []) + ([beta] if beta is not None else [])
    made = torch.stack(coef) @ w.reshape(d, -1) if coef else None  # [mean_d(gamma W); beta W]
    wc = torch.empty(w.shape, dtype=w.dtype, device=w.device)
    if kind == "layer":
        torch.addcmul(made[0].neg().view(w.shape[1:]), w, gamma[:, None, None, None], out=wc)
    else:
        torch.mul(w, gamma[:, None, None, None], out=wc)
    shift = None if bias is None else bias.reshape(w.shape[1:])
    if beta is not None:
        beta_w = made[-1].view(w.shape[1:])
        shift = beta_w if shift is None else shift + beta_w
    return wc, output if shift is None else output - shift


# Per-slot gradients are made for a sink in blocks of whole rows (at least one): enough rows for BLOCK_POSITIONS
# positions, so each slot's matmul [rows*pos, e] @ [e, d] has rows enough to run at its speed, and no more, so the
# block stays in cache for the sink to read; never more than BLOCK_BYTES. Measured, the slot backward of one layer
# (alternated, medians): at d_model 256 x 16 prompts 2 MiB (2-10 rows) beat one row and 32 MiB, and 64 positions is
# within noise of it; at GPT-2 small's width (768, 36 slots: a row of 16 positions is 1.8 MB) 2 MiB meant one row,
# and 64 positions (2-4 rows) is 5-13 % faster.
BLOCK_POSITIONS = 64
BLOCK_BYTES = 1 << 24


def _to_sink(ctx, gs, proj, xhat, wc, shape) -> torch.Tensor:
    """Hand the sink each row's per-slot gradients at positions ``sink.start..`` and return the slots' gradient
    as their sum spread evenly over them: the input reads every slot, so what flows upstream is the same.

    The gradients are made for blocks of rows at once (``BLOCK_POSITIONS`` positions, ``BLOCK_BYTES`` at most,
    never all rows of a long input): one batched matmul ``[slot, rows*pos, e] @ [slot, e, d]`` per block. A sink
    with a true ``takes_row_blocks`` attribute is called once per block with ``slice(first row, last row + 1)`` and the
    block's ``[role, head, rows, pos, d]``; any other once per row with that row's ``[role, head, pos, d]``
    view of the block (no copy)."""
    b, p, r, h, d = shape
    rows, slots, e = gs.shape
    sink, start = ctx.sink, ctx.sink.start
    q = p - start
    # The slots' summed gradient: from positions start.. it is the sum of the per-slot gradients made for the
    # sink below; before start (never handed to the sink) one matmul makes it.
    summed = xhat.new_empty(b, p, d)
    if start > 0:
        front = gs.view(b, p, slots * e)[:, :start].reshape(-1, slots * e) @ wc.reshape(d, slots * e).T
        if proj is not None:
            front.addcmul_(xhat.view(b, p, d)[:, :start].reshape(-1, d),
                           proj.view(b, p, slots)[:, :start].sum(-1).reshape(-1, 1), value=-1)
        summed[:, :start] = front.view(b, start, d)
    if q == 0:
        return (summed / slots).to(ctx.dtype).view(b, p, 1, 1, d).expand(b, p, r, h, d)
    w = wc.reshape(d, slots, e).permute(1, 2, 0)  # [slot, e, d]
    per_row = slots * q * d * xhat.element_size()
    block = max(1, min(b, -(-BLOCK_POSITIONS // q), BLOCK_BYTES // per_row))
    for i0 in range(0, b, block):
        i1 = min(b, i0 + block)
        n = i1 - i0
        g_blk = gs.view(b, p, slots, e)[i0:i1, start:].permute(2, 0, 1, 3).reshape(slots, n * q, e)
        u = torch.bmm(g_blk, w)  # [slot, rows*pos, d]
        if proj is not None:
            p_blk = proj.view(b, p, slots)[i0:i1, start:].permute(2, 0, 1).reshape(slots, n * q, 1)
            u.addcmul_(xhat.view(b, p, d)[i0:i1, start:].reshape(1, n * q, d), p_blk, value=-1)
        u5 = u.view(r, h, n, q, d)
        if getattr(sink, "takes_row_blocks", False):  # the whole block at once: rows i0..i1 - 1
            sink(slice(i0, i1), u5, *ctx.where)
        else:
            for j in range(n):
                sink(i0 + j, u5[:, :, j], *ctx.where)
        summed[i0:i1, start:] = u.sum(dim=0).view(n, q, d)
    return (summed / slots).to(ctx.dtype).view(b, p, 1, 1, d).expand(b, p, r, h, d)


def slot_gradient(
    slots: torch.Tensor, x: torch.Tensor, norm: nn.Module | None, weight: torch.Tensor, output: torch.Tensor,
    bias: torch.Tensor | None, sink: SlotSink | None = None, where: tuple[int, int] = (0, 1), carry: bool = False,
) -> torch.Tensor:
    """Zero ``[b, p, R, H, e]`` whose gradient reaches each slot of ``slots [b, p, R, H, d]`` as if the slot
    had been normalised by ``norm`` at ``x [b, p, d]`` and projected by its columns ``weight [d, R, H, e]``;
    ``output`` is the projection's output at ``x`` (``[b, p, R, H, e]``) and ``bias`` its bias (or None).
    ``x`` itself gets no gradient from it (see the module docstring). With a ``sink``
    (:class:`~crosspatch.reach.SlotSink`) the per-slot gradients go to it, row by row, ``where`` saying
    which roles and heads ``slots`` are (first role, head step), and the slots get their sum. Under
    grouped-query attention the key/value ``slots`` are the key/value heads' inputs (the mean of each group's
    slots, ``inputs.HeadIn``), so the sink gets each key/value head's own gradient with head step = the group.
    With ``carry`` it returns ``output`` itself instead of the zero (``output + zero`` without making the zero
    or the sum: two passes over the projection's output fewer per layer), its own gradient passed through."""
    xhat, rstd, gamma, kind = _stats(norm, x)
    # The weights' share (wc, yhat: _weights) is made in the backward, each layer's freed before the next's.
    beta = getattr(norm, "bias", None)
    return _SlotGradient.apply(slots, output if carry else None, xhat, rstd, gamma, weight.detach(), output.detach(),
                               None if bias is None else bias.detach(), None if beta is None else beta.detach(),
                               kind, sink, where)
