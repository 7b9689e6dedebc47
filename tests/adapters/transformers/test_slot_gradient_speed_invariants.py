"""What the fast paths of head_in must keep: the zero-valued slot-gradient term (adapters/transformers/slot_grad.py)
gives each slot the gradient of its own norm and projection, for LayerNorm, RMSNorm and no norm, in double and in
half dtypes; its slot gradient is laid out slot-major (what ``edges._slots_first`` reads as a view); the block
input's gradient is the same with head_in tapped (reached through the slots) as without; and a write that hands
back the value itself is taken as a pure read without comparing anything."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import crosspatch as cp
import crosspatch.adapters.transformers.inputs as inputs
from conftest import randomize, tiny_bert, tiny_gpt2, tiny_llama, tiny_neox
from crosspatch.adapters.transformers.inputs import LAYOUTS, HeadIn, _same_bits
from crosspatch.engine.reach import aliases as _aliases
from crosspatch.adapters.transformers.slot_grad import slot_gradient
from crosspatch.methods.attribution import _Tap

B, P, R, H, E, D = 2, 3, 3, 4, 5, 16


def _norm(kind: str, dtype: torch.dtype) -> nn.Module | None:
    gen = torch.Generator().manual_seed(1)
    if kind == "none":
        return None
    norm = nn.LayerNorm(D, eps=1e-5) if kind == "layer" else nn.RMSNorm(D, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.5 * torch.randn(D, generator=gen))
        if kind == "layer":
            norm.bias.copy_(0.5 * torch.randn(D, generator=gen))
    return norm.to(dtype)


def _by_hand(norm: nn.Module | None, h: torch.Tensor) -> torch.Tensor:
    """The norm written out in float64 from its parameters (not the code under test)."""
    if norm is None:
        return h
    w = norm.weight.detach().double()
    if isinstance(norm, nn.LayerNorm):
        return F.layer_norm(h, (D,), w, norm.bias.detach().double(), norm.eps)
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.eps) * w


@pytest.mark.parametrize("kind", ["layer", "rms", "none"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_slot_gradients_are_each_slots_own_norm_and_projection(kind, dtype):
    gen = torch.Generator().manual_seed(0)
    norm = _norm(kind, dtype)
    x = (2 * torch.randn(B, P, D, generator=gen, dtype=torch.float64) + 0.3).to(dtype)
    weight = torch.randn(D, R, H, E, generator=gen, dtype=torch.float64).to(dtype)
    bias = torch.randn(R, H, E, generator=gen, dtype=torch.float64).to(dtype)
    g = torch.randn(B, P, R, H, E, generator=gen, dtype=torch.float64)
    slots = x[:, :, None, None, :].expand(B, P, R, H, D).clone().requires_grad_()

    # The fast path as HeadIn uses it: the module's own output of x (read cut from the graph) plus the zero term.
    normed = x if norm is None else norm(x)
    orig = torch.einsum("bpd,drhe->bprhe", normed, weight) + bias
    keep = orig + slot_gradient(slots, x, norm, weight, orig.detach(), bias)
    (grad_slots,) = torch.autograd.grad((keep * g.to(dtype)).sum(), [slots])

    # Oracle: every slot normalised and projected on its own, in float64 from the same (rounded) values.
    s = slots.detach().double().requires_grad_()
    out = torch.einsum("bprhd,drhe->bprhe", _by_hand(norm, s), weight.double()) + bias.double()
    (want,) = torch.autograd.grad((out * g).sum(), [s])

    assert grad_slots.dtype == dtype
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(grad_slots.double(), want, rtol=0, atol=tol * want.abs().max())
    assert want.abs().max() > 0.1  # the slots' gradients are not trivially small


def test_slot_gradient_is_slot_major():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(B, P, D, generator=gen)
    slots = x[:, :, None, None, :].expand(B, P, R, H, D).clone().requires_grad_()
    weight = torch.randn(D, R, H, E, generator=gen)
    orig = torch.einsum("bpd,drhe->bprhe", F.layer_norm(x, (D,)), weight)
    (grad,) = torch.autograd.grad(slot_gradient(slots, x, nn.LayerNorm(D), weight, orig, None).sum(), [slots])
    assert grad.shape == slots.shape
    assert grad.permute(2, 3, 0, 1, 4).is_contiguous()


def _metric(out):
    return out[:, -1].log_softmax(-1)[:, 7].sum()


@pytest.mark.parametrize("name", ["gpt2", "llama", "neox", "bert"])
def test_the_block_input_gradient_is_the_same_with_head_in_tapped(name, ids):
    make = {"gpt2": tiny_gpt2, "llama": tiny_llama, "neox": tiny_neox, "bert": lambda: tiny_bert("mlm")}[name]
    m = cp.wrap(randomize(make()).double())

    def block_input_grad(sites):
        taps = {key: _Tap() for key in sites}
        (grad,) = torch.autograd.grad(_metric(m.run(ids, taps, grad=True).output), [taps["resid_pre.1"].delta])
        return grad

    plain = block_input_grad(["resid_pre.1"])
    tapped = block_input_grad(["resid_pre.1", "head_in.1"])
    # Llama's RMSNorm rounds to float32 even in double: its own backward (the untapped path) does too.
    scale = plain.abs().max()
    torch.testing.assert_close(tapped, plain, rtol=0, atol=(1e-6 if name == "llama" else 1e-12) * scale)
    assert scale > 1e-3


def test_alias_and_bit_checks():
    x = torch.randn(2, 3, 8)
    value = x[:, :, None, None, :].expand(2, 3, 3, 3, 8)
    assert _aliases(value, value) and _aliases(value.view_as(value), value)
    assert not _aliases(value.clone(), value)
    square = torch.randn(4, 4)
    assert not _aliases(square.T, square)  # same shape, same storage, other elements
    assert not _aliases(square[1:], square[:-1]) and not _aliases(square.view(torch.int32), square)
    assert _same_bits(value.clone(), value)
    changed = value.clone()
    changed[1, 2, 0, 1, 5] = torch.nextafter(changed[1, 2, 0, 1, 5], torch.tensor(float("inf")))
    assert not _same_bits(changed, value)
    zero = torch.zeros(4, 6)
    assert torch.equal(-zero, zero) and not _same_bits(-zero, zero)  # the writing path then finds no change
    odd = torch.randn(4, 7)  # not a whole number of int64: compared element by element
    assert _same_bits(odd.clone(), odd) and not _same_bits(odd + 1, odd)
    half = torch.randn(4, 8, dtype=torch.float16)
    assert _same_bits(half.clone(), half) and not _same_bits(half * 2, half)


@pytest.mark.parametrize("grad", [False, True])
def test_a_value_handed_back_is_a_pure_read(monkeypatch, ids, grad):
    gpt = randomize(tiny_gpt2())
    reach = HeadIn(gpt.transformer, "h.{layer}", LAYOUTS["gpt2"], gpt.config.n_head, True)
    with torch.inference_mode():
        plain = gpt(ids).logits

    def run(callback):
        handles = reach.install(1, callback)
        try:
            with torch.enable_grad() if grad else torch.inference_mode():
                return gpt(ids).logits
        finally:
            for handle in handles:
                handle.remove()

    def no_compare(a, b):
        raise AssertionError("a value handed back as it was needs no comparison")

    with monkeypatch.context() as patched:
        patched.setattr(inputs, "_same_bits", no_compare)
        assert torch.equal(run(lambda value: value), plain)
        assert torch.equal(run(lambda value: value.view_as(value)), plain)
    assert torch.equal(run(lambda value: value.clone()), plain)  # compared, found equal: the same numbers
    edited = run(lambda value: value + torch.randn(value.shape, generator=torch.Generator().manual_seed(3)))
    assert (edited - plain).abs().max() > 1e-3
