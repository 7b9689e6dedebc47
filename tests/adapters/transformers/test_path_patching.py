"""Path patching on a tiny GPT-2: cuts of the residual stream as oracles, and a hand-written 3-step loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import crosspatch as cp
from conftest import randomize, tiny_gpt2
from crosspatch.methods.path_patching import path_patching


def _metric(clean):
    answer = clean[:, -1]
    return cp.metrics.logit_diff(answer, (answer + 1) % 100)


@pytest.fixture
def model():
    return randomize(tiny_gpt2(initializer_range=0.2))


def test_through_a_full_cut_equals_the_total_effect(model, pair):
    """Every path from a layer-0 head to the output passes resid_pre.1: path patching = activation patching."""
    clean, corrupt = pair
    metric = _metric(clean)
    path = path_patching(model, clean, corrupt, "head_out.0[head=*]", "resid_pre.1", metric)
    total = cp.activation_patching(model, clean, corrupt, "head_out.0[head=*]", metric, direction="noising")
    assert path.dims == ("head",) and path.coords == total.coords
    np.testing.assert_allclose(path.values, total.values, atol=1e-5)
    assert np.abs(total.values).max() > 1e-3


def test_through_unrelated_receivers_is_zero(model, pair):
    clean, corrupt = pair  # they differ at position 3: the heads' writes at positions 0..2 do not change
    metric = _metric(clean)
    before = path_patching(model, clean, corrupt, "head_out.0[head=*]", "resid_pre.1[pos=0:3]", metric)
    upstream = path_patching(model, clean, corrupt, "head_out.1[head=*]", "resid_pre.1", metric)
    assert np.all(before.values == 0.0) and np.all(upstream.values == 0.0)


def test_without_freezing_the_final_residual_carries_everything(model, pair):
    clean, corrupt = pair
    metric = _metric(clean)
    path = path_patching(model, clean, corrupt, "head_out.*[head=*]", "resid_post.1", metric, freeze=None)
    total = cp.activation_patching(model, clean, corrupt, "head_out.*[head=*]", metric, direction="noising")
    np.testing.assert_allclose(path.values, total.values, atol=1e-5)
    # Freezing the later heads removes the paths through them: different for layer 0, same for layer 1.
    frozen = path_patching(model, clean, corrupt, "head_out.*[head=*]", "resid_post.1", metric)
    np.testing.assert_allclose(frozen.values[1], total.values[1], atol=1e-5)
    assert not np.allclose(frozen.values[0], total.values[0], atol=1e-5)


def _three_steps(m, clean, corrupt, sender, receiver, metric):
    """The IOI algorithm written out with the public run API, one sender and receiver at a time."""
    clean_cache = m.capture(clean, ["head_out.*"])
    base = metric(m.run(clean).output)
    freeze = {
        f"head_out.{l}[head={h}]": cp.Patch(clean_cache)
        for l in range(2) for h in range(4) if f"head_out.{l}[head={h}]" not in (sender, receiver)
    }
    step2 = m.run(clean, {**freeze, sender: cp.Patch(corrupt)}, capture=[receiver])
    out = m.run(clean, {receiver: cp.Patch(step2.cache)}).output
    return (metric(out) - base).mean().item()


@pytest.mark.parametrize("batch_size", [1, 64])
def test_swept_receivers_match_the_three_step_loop(model, pair, batch_size):
    clean, corrupt = pair
    metric = _metric(clean)
    m = cp.wrap(model)
    result = path_patching(m, clean, corrupt, "head_out.0[head=*]", "head_out.1[head=*]", metric, batch_size=batch_size)
    assert result.dims == ("head", "receiver") and result.values.shape == (4, 4)
    assert result.coords["receiver"] == [f"head_out.1[head={h}]" for h in range(4)]
    expected = np.array([
        [_three_steps(m, clean, corrupt, f"head_out.0[head={s}]", f"head_out.1[head={r}]", metric) for r in range(4)]
        for s in range(4)
    ])
    np.testing.assert_allclose(result.values, expected, atol=1e-5)


def test_joint_receivers_denoising_and_identity(model, pair):
    clean, corrupt = pair
    metric = _metric(clean)
    joint = path_patching(model, clean, corrupt, "head_out.0[head=*]", ["resid_pre.1[pos=3:]", "resid_pre.1[pos=0:3]"], metric)
    whole = path_patching(model, clean, corrupt, "head_out.0[head=*]", "resid_pre.1", metric)
    np.testing.assert_allclose(joint.values, whole.values, atol=1e-6)
    same = path_patching(model, clean, clean, "head_out.0[head=*]", "resid_pre.1", metric, direction="denoising")
    assert np.all(same.values == 0.0)
    norm = path_patching(model, clean, corrupt, "head_out.0[head=*]", "resid_pre.1", metric, normalize=True)
    np.testing.assert_allclose(norm.values * norm.metadata["total_effect"], whole.values, atol=1e-9)
    assert norm.metadata["method"] == "path_patching"


def _through_one_head_input(model, m, clean, corrupt, sender_head, role, head, metric):
    """Path patching into layer 1's head ``head`` through its ``role`` input (0 query, 1 key, 2 value),
    step 3 written with plain torch hooks: that head's columns of ``c_attn`` are recomputed from the
    step-2 residual, nothing else in layer 1 sees it (crosspatch's head_in reach is not used)."""
    frozen = {f"head_out.0[head={h}]": cp.Patch(m.capture(clean, ["head_out.0"])) for h in range(4) if h != sender_head}
    step2 = m.run(clean, {**frozen, f"head_out.0[head={sender_head}]": cp.Patch(m.capture(corrupt, ["head_out.0"]))},
                  capture=["resid_pre.1"])
    x_new = step2.cache["resid_pre.1"]
    block = model.transformer.h[1]
    d, d_head = model.config.n_embd, model.config.n_embd // model.config.n_head
    cols = slice(role * d + head * d_head, role * d + (head + 1) * d_head)
    with torch.no_grad():
        replacement = block.attn.c_attn(block.ln_1(x_new))[..., cols]

    def swap(module, args, output):
        output = output.clone()
        output[..., cols] = replacement
        return output

    handle = block.attn.c_attn.register_forward_hook(swap)
    try:
        with torch.no_grad():
            out = model(clean).logits
    finally:
        handle.remove()
    with torch.no_grad():
        base = model(clean).logits
    return (metric(out) - metric(base)).mean().item()


def test_receivers_at_a_heads_query_key_and_value_inputs(model, pair):
    """head_in receivers: each role of each head of layer 1 against the hand-hooked three steps."""
    clean, corrupt = pair
    metric = _metric(clean)
    m = cp.wrap(model)
    result = path_patching(m, clean, corrupt, "head_out.0[head=*]", "head_in.1[qkv=*,head=*]", metric)
    assert result.dims == ("head", "receiver") and result.values.shape == (4, 12)
    expected = np.array([
        [_through_one_head_input(model, m, clean, corrupt, s, role, head, metric) for role in range(3) for head in range(4)]
        for s in range(4)
    ])
    assert np.abs(expected).max() > 1e-3
    np.testing.assert_allclose(result.values, expected, atol=1e-5)
    # Every head's query, key and value inputs at once carry what reaches layer 1's attention: the paths
    # through the MLP of layer 1 and the direct path are left out, so the total differs.
    attention = path_patching(m, clean, corrupt, "head_out.0[head=*]", ["head_in.1"], metric)
    cut = path_patching(m, clean, corrupt, "head_out.0[head=*]", "resid_pre.1", metric)
    assert not np.allclose(attention.values, cut.values, atol=1e-4)
