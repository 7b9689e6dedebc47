"""AtP*'s query/key fix (core/methods/qk_fix.py) on a tiny GPT-2 whose head 1.0 has a saturated softmax:
the exact patterns it uses equal the patterns of real patched runs, and its estimates of patching a head's
query input are far closer to exact activation patching than linear AtP's."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import crosspatch as cp
from conftest import randomize, tiny_gpt2
from crosspatch.engine.interventions import Patch
from crosspatch.methods.attribution import attribution_patching
from crosspatch.methods.qk_fix import QKLayer, exact_patterns


@pytest.fixture(scope="module")
def saturated():
    model = randomize(tiny_gpt2(initializer_range=0.2)).double()
    with torch.no_grad():
        model.transformer.h[1].attn.c_attn.weight[:, 0:16] *= 8.0  # head 0's queries: a saturated softmax
    m = cp.wrap(model)
    clean = torch.randint(2, 100, (4, 8), generator=torch.Generator().manual_seed(1))
    corrupt = clean.clone()
    corrupt[:, -1] = (clean[:, -1] + 13) % 98 + 2
    metric = cp.metrics.logit_diff(clean[:, -1], (clean[:, -1] + 1) % 100)
    return m, clean, corrupt, metric


def test_saturated_head_query_is_fixed(saturated):
    m, clean, corrupt, metric = saturated
    top = m.capture(clean, "attn_pattern.1")["attn_pattern.1"][:, 0, -1].max(-1).values
    assert top.min() > 0.9  # saturated: the last query puts > 90% on one key
    for pattern in ("head_in.1[qkv=0,head=*]", "head_in.1[qkv=1,head=*]"):
        exact = cp.activation_patching(m, clean, corrupt, pattern, metric).values
        atp = attribution_patching(m, clean, corrupt, pattern, metric).values
        star = attribution_patching(m, clean, corrupt, pattern, metric, qk_fix=True)
        err_atp, err_star = np.abs(atp - exact), np.abs(star.values - exact)
        assert err_star.sum() < 0.5 * err_atp.sum(), (pattern, exact, atp, star.values)
        np.testing.assert_allclose(star.metadata["atp"], atp)  # plain AtP kept alongside
    # head 0's query: exact -0.50; AtP +0.02 (wrong sign, the softmax gradient is ~0); AtP* -0.40.
    exact = cp.activation_patching(m, clean, corrupt, "head_in.1[qkv=0,head=0]", metric).values
    atp = attribution_patching(m, clean, corrupt, "head_in.1[qkv=0,head=0]", metric).values
    star = attribution_patching(m, clean, corrupt, "head_in.1[qkv=0,head=0]", metric, qk_fix=True).values
    assert abs(exact) > 0.3 and np.sign(atp) != np.sign(exact) and np.sign(star) == np.sign(exact)
    assert abs(star - exact) < 0.25 * abs(atp - exact)


def test_value_sites_are_plain_atp_and_key_positions_are_refused(saturated):
    m, clean, corrupt, metric = saturated
    atp = attribution_patching(m, clean, corrupt, "head_in.*[qkv=2,head=*]", metric, grad_drop=True)
    star = attribution_patching(m, clean, corrupt, "head_in.*[qkv=2,head=*]", metric, grad_drop=True, qk_fix=True)
    np.testing.assert_array_equal(atp.values, star.values)
    assert star.metadata["variant"] == "atp*"
    with pytest.raises(ValueError, match="key sites must take every position"):
        attribution_patching(m, clean, corrupt, "head_in.1[qkv=1,pos=3]", metric, qk_fix=True)


def test_exact_patterns_equal_patched_runs(saturated):
    m, clean, corrupt, _ = saturated
    keys = ["head_in.0", "head_in.1"]
    base, source = m.capture(corrupt, keys), m.capture(clean, keys)
    layers = [QKLayer(k, f"attn_pattern.{k[-1]}") for k in keys]
    got = exact_patterns(m, m.prepare(corrupt), {k: base[k] for k in keys}, {k: source[k] for k in keys}, layers)
    for role in (0, 1):  # layer 1's pattern with only layer 1's queries (keys) patched: layer 0 left alone
        run = m.run(corrupt, {f"head_in.1[qkv={role}]": Patch(source)}, capture="attn_pattern.1")
        torch.testing.assert_close(got["head_in.1"][role], run.cache["attn_pattern.1"], rtol=1e-9, atol=1e-12)
