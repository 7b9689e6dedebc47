"""Every pair method runs in bfloat16 and float16 on the CPU, within stated tolerances of float32.

The oracle is the same method on the same weights in float32. Tolerances are relative to the largest
float32 value of the method (effects of about 0.2-0.7 here, logits of about 5): bfloat16 keeps 8
significant bits (a relative step of 2^-8 = 0.004 per rounding) and float16 11 (2^-11 = 0.0005); the
errors add up through the layers and, for effects, a difference of two runs cancels most of the value
they are taken of. Measured worst relative errors (bfloat16 / float16): activation patching of
``resid_pre`` 0.023 / 0.004, of heads 0.12 / 0.012 (head effects are small against the logits they
change), AtP 0.04 / 0.002, path patching 0.07 / 0.005, EAP 0.017 / 0.002, EAP-IG 0.019 / 0.002,
mediation (TE, NDE, NIE) 0.031 / 0.0016, CD-T relevance of every head 0.042 / 0.0029; each tolerance is
about twice that. A low-precision run must also differ from float32 (it really ran in that dtype) and
keep the ranking of the largest effects.

ACDC decides edge by edge against a threshold, and its removals stick, so rounding can flip decisions
near it and the flips carry on: in float16 it kept the float32 circuit exactly on a CPU without AVX-512
and flips 2 of the 110 decisions on one with AVX-512 (other float16 kernels); in bfloat16 31 of 110
flipped. Its test asserts that float16 keeps at least 95 % of the float32 decisions, and only that
bfloat16 runs and keeps a circuit.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import crosspatch as cp
from conftest import randomize, tiny_gpt2
from crosspatch.methods.attribution import attribution_patching
from crosspatch.methods.edges import acdc, eap, eap_ig
from crosspatch.methods.path_patching import path_patching

G = torch.Generator().manual_seed(0)
CLEAN = torch.randint(1, 100, (3, 8), generator=G)
CORRUPT = CLEAN.clone()
CORRUPT[:, 4] = CORRUPT[:, 4] % 99 + 1
METRIC = cp.metrics.logit_diff(CLEAN[:, -1], CLEAN[:, -1] % 99 + 1)

METHODS = {
    "activation_patching_resid": lambda m: cp.activation_patching(m, CLEAN, CORRUPT, "resid_pre.*[pos=*]", METRIC,
                                                                  progress=False),
    "activation_patching_heads": lambda m: cp.activation_patching(m, CLEAN, CORRUPT, "head_out.*[head=*]", METRIC,
                                                                  progress=False),
    "attribution_patching": lambda m: attribution_patching(m, CLEAN, CORRUPT, "head_out.*[head=*]", METRIC),
    "path_patching": lambda m: path_patching(m, CLEAN, CORRUPT, "head_out.0[head=*]", "resid_pre.1", METRIC,
                                             progress=False),
    "eap": lambda m: eap(m, CLEAN, CORRUPT, METRIC),
    "eap_ig": lambda m: eap_ig(m, CLEAN, CORRUPT, METRIC, steps=3),
    "mediation": lambda m: cp.mediation(m, CLEAN, CORRUPT, ["head_out.1[head=0]", "mlp_out.0"], METRIC,
                                        n_boot=50).to_result(),
    "cdt": lambda m: cp.cdt(m, CLEAN, "head_out.*[head=*]", METRIC, progress=False),
}
# relative tolerances (of the largest float32 value): bfloat16, float16
TOLERANCE = {
    "activation_patching_resid": (0.05, 0.01),
    "activation_patching_heads": (0.25, 0.03),
    "attribution_patching": (0.08, 0.005),
    "path_patching": (0.15, 0.01),
    "eap": (0.04, 0.005),
    "eap_ig": (0.04, 0.005),
    "mediation": (0.06, 0.004),
    "cdt": (0.08, 0.006),
}


@pytest.fixture(scope="module")
def models():
    base = randomize(tiny_gpt2(initializer_range=0.2))
    return {dtype: cp.wrap(copy.deepcopy(base).to(dtype)) for dtype in (torch.float32, torch.bfloat16, torch.float16)}


@pytest.fixture(scope="module")
def reference(models):
    return {name: np.asarray(fn(models[torch.float32]).values, dtype=np.float64) for name, fn in METHODS.items()}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("name", list(METHODS))
def test_method_runs_in_low_precision_within_its_tolerance(models, reference, name, dtype):
    m = models[dtype]
    assert next(m.module.parameters()).dtype == dtype
    got = np.asarray(METHODS[name](m).values, dtype=np.float64)
    want = reference[name]
    scale = np.abs(want).max()
    assert scale > 0.1 and np.isfinite(got).all()
    err = np.abs(got - want).max() / scale
    assert 0 < err <= TOLERANCE[name][dtype == torch.float16], f"{name} in {dtype}: relative error {err:.3g}"
    top = np.argsort(-np.abs(want.reshape(-1)))[:3]
    assert set(top) <= set(np.argsort(-np.abs(got.reshape(-1)))[:5])  # the largest effects stay on top


def test_acdc_keeps_the_float32_circuit_in_float16_and_runs_in_bfloat16(models):
    kept = {dtype: np.asarray(acdc(m, CLEAN, CORRUPT, METRIC, threshold=0.01).values) != 0 for dtype, m in models.items()}
    assert 0 < kept[torch.float32].sum() < kept[torch.float32].size
    assert (kept[torch.float16] == kept[torch.float32]).mean() >= 0.95
    assert kept[torch.bfloat16].any()
