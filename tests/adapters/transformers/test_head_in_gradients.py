"""head_in gradients (the zero-valued per-slot term of adapters/transformers/slot_grad.py) per head and role,
for GPT-2 (LayerNorm), Llama (RMSNorm, grouped-query attention), GPT-NeoX (parallel residual, head-major
fused projection), BERT (post-LN: no norm in front of q/k/v) and Gemma (RMSNorm scaling by 1 + weight),
against two oracles: autograd through
the exact write path (the slot normalised and projected on its own) and central finite differences."""

from __future__ import annotations

import pytest
import torch

import crosspatch as cp
from conftest import randomize, tiny_bert, tiny_gpt2, tiny_llama, tiny_neox
from crosspatch.engine.interventions import Patch
from crosspatch.methods.attribution import _Tap
from test_head_in_parallel_post_ln import _sharpened

SLOTS = {  # (role, head)
    "gpt2": [(0, 1), (1, 3), (2, 0)], "llama": [(0, 3), (1, 1), (2, 2)], "neox": [(0, 2), (1, 1), (2, 3)],
    "bert": [(0, 0), (1, 3), (2, 1)], "gemma": [(0, 1), (1, 0), (2, 1)],
}
MODELS = {
    "gpt2": lambda: tiny_gpt2(initializer_range=0.2), "llama": tiny_llama, "neox": tiny_neox,
    "bert": lambda: tiny_bert("mlm"), "gemma": lambda: _tiny_gemma(),
}


def _tiny_gemma():
    """Gemma's RMSNorm scales by ``1 + weight`` (inferred, not in the table)."""
    from crosspatch.adapters.transformers.tiny import tiny_model

    torch.manual_seed(0)
    return tiny_model("gemma").eval()


def _metric(out):
    return out[:, -1].log_softmax(-1)[:, 7].sum()


@pytest.mark.parametrize("name", sorted(SLOTS))
def test_head_in_gradient_matches_the_exact_write_path(name):
    model = (randomize(MODELS[name]()) if name in ("gpt2", "llama", "gemma") else _sharpened(MODELS[name]())).double()
    m = cp.wrap(model)
    ids = torch.randint(2, 100, (2, 6), generator=torch.Generator().manual_seed(5))
    tap = _Tap()
    (grad,) = torch.autograd.grad(_metric(m.run(ids, {"head_in.1": tap}, grad=True).output), [tap.delta])
    base = m.capture(ids, "head_in.1")["head_in.1"]
    gen = torch.Generator().manual_seed(6)
    for role, head in SLOTS[name]:
        v = torch.randn(base.shape[0], base.shape[1], base.shape[-1], generator=gen, dtype=torch.float64)

        def write(step: float, grad: bool = False):
            edited = base.clone()
            edited[:, :, role, head] += step * v
            edited.requires_grad_(grad)
            cache = cp.Cache({"head_in.1": edited}, {"head_in.1": ()})
            return edited, _metric(m.run(ids, {f"head_in.1[qkv={role},head={head}]": Patch(cache)}, grad=grad).output)

        # Oracle 1: autograd through the recomputation a changed slot takes, a hair away from the block input.
        edited, value = write(1e-9, grad=True)
        (exact,) = torch.autograd.grad(value, [edited])
        torch.testing.assert_close(grad[:, :, role, head], exact[:, :, role, head], rtol=1e-5, atol=1e-7)
        assert exact[:, :, role, head].abs().max() > 1e-3
        if name not in ("llama", "gemma"):  # Oracle 2: central differences (their RMSNorms round to float32 even in double)
            eps = 1e-4
            numeric = (float(write(eps)[1]) - float(write(-eps)[1])) / (2 * eps)
            assert float((grad[:, :, role, head] * v).sum()) == pytest.approx(numeric, rel=1e-5)
    if name == "llama":  # a key/value head reads the mean of its two query heads' slots: each gets half its gradient
        torch.testing.assert_close(grad[:, :, 1:, 1::2], grad[:, :, 1:, 0::2], rtol=0, atol=0)
        assert grad[:, :, 1:].abs().amax(dim=(0, 1, 4)).min() > 1e-6
