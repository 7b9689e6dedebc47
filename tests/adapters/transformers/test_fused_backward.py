"""The fused tanh-GELU backward of gradient runs: forward values bit for bit, gradients as autograd's through
the module's own chain of ops, hooks gone afterwards, and no shortcut when a global hook could change outputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import activations

import crosspatch as cp
from crosspatch.engine.forward import Bound, execute
from crosspatch.methods.attribution import _Tap
from crosspatch.sites.site import Site
from crosspatch.adapters.transformers.fused_backward import gelu_tanh_hooks
from conftest import tiny_gpt2


@pytest.mark.parametrize("cls", ["NewGELUActivation", "FastGELUActivation", "AccurateGELUActivation"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_module_gradient_equals_autograd_through_its_chain(cls, dtype):
    module = getattr(activations, cls)()
    holder = nn.Sequential(module)
    x = (3 * torch.randn(4, 7, 33, dtype=torch.float64)).to(dtype).requires_grad_()
    g = torch.randn(4, 7, 33, dtype=torch.float64).to(dtype)
    y_ref = module(x)
    (grad_ref,) = torch.autograd.grad(y_ref, x, g)
    handles = gelu_tanh_hooks(holder)
    assert len(handles) == 1
    try:
        y = holder(x)
        (grad,) = torch.autograd.grad(y, x, g)
    finally:
        for h in handles:
            h.remove()
    assert torch.equal(y, y_ref)  # the module's own values
    assert y.grad_fn.name().endswith("_TanhGeluBackward")
    # float64: FastGELU's constant 0.7978845608 is sqrt(2 / pi) to 10 digits, so its derivative differs at ~1e-9
    tol = {torch.float64: 1e-8, torch.float32: 1e-5, torch.bfloat16: 3e-2}[dtype]
    torch.testing.assert_close(grad.double(), grad_ref.double(), rtol=tol, atol=tol)
    assert not module._forward_hooks


def test_no_shortcut_outside_grad_or_under_a_global_hook():
    module = activations.NewGELUActivation()
    x = torch.randn(3, 5, requires_grad=True)
    handles = gelu_tanh_hooks(module)
    try:
        with torch.no_grad():
            assert module(x).grad_fn is None
        assert module(x.detach()).grad_fn is None  # nothing upstream needs gradients
    finally:
        for h in handles:
            h.remove()
    glob = nn.modules.module.register_module_forward_hook(lambda mod, args, out: None)
    try:
        assert gelu_tanh_hooks(module) == []
    finally:
        glob.remove()


def test_gpt2_gradient_run_equals_one_without_the_shortcut():
    """Taps at every head_z and mlp_act of a GPT-2: same values, gradients to float rounding, no hook left."""
    model = tiny_gpt2(n_layer=3).double()
    m = cp.wrap(model)
    ids = torch.randint(0, 100, (3, 9))
    inputs = m.prepare(ids)
    keys = [f"{f}.{layer}" for layer in range(3) for f in ("head_z", "mlp_act", "resid_pre")]

    def grads(adapter):
        taps = {k: _Tap() for k in keys}
        run = execute(model, adapter, m.catalog, inputs, [Bound(Site.parse(k), t) for k, t in taps.items()], grad=True)
        out = run.output[:, -1].logsumexp(-1).sum()
        return run.output.detach(), torch.autograd.grad(out, [taps[k].delta for k in keys])

    class Plain(type(m.adapter)):
        def gradient_hooks(self, model):
            return []

    fused_out, fused = grads(m.adapter)
    plain_out, plain = grads(Plain())
    assert torch.equal(fused_out, plain_out)
    for k, a, b in zip(keys, fused, plain):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=k)
    acts = [mod for mod in model.modules() if isinstance(mod, activations.NewGELUActivation)]
    assert len(acts) == 3 and not any(mod._forward_hooks for mod in acts)
