"""Unfused attention: same state dict, same outputs; the adapter's swap leaves the user's model as it was."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import crosspatch as cp
from clip_models import images, texts, tiny_open_clip
from crosspatch.adapters.open_clip import UnfusedAttention, unfuse

VARIANTS = {
    "default": {},
    "layer_scale": {"ls_init_value": 0.5},
    "custom_qk_norm": {"qk_norm": True},
    "custom_head_scale_inner_norm": {"scale_heads": True, "scale_attn_inner": True},
}


def _features(model, x, ids):
    with torch.no_grad():
        return model.encode_image(x), model.encode_text(ids)


@pytest.mark.parametrize("variant", VARIANTS)
def test_unfused_model_equals_fused(variant):
    model = tiny_open_clip(**VARIANTS[variant])
    copy = unfuse(model)
    blocks = list(copy.visual.transformer.resblocks) + list(copy.transformer.resblocks)
    assert all(isinstance(b.attn, UnfusedAttention) for b in blocks)
    assert not any(isinstance(m, UnfusedAttention) for m in model.modules())  # the original is untouched
    assert list(copy.state_dict()) == list(model.state_dict())  # same keys, same order
    x, ids = images(3), texts(4)
    for fused, unfused in zip(_features(model, x, ids), _features(copy, x, ids)):
        torch.testing.assert_close(unfused, fused, atol=1e-5, rtol=0)


def test_state_dicts_load_both_ways():
    model, other = tiny_open_clip(seed=0), unfuse(tiny_open_clip(seed=1))
    other.load_state_dict(model.state_dict())
    x, ids = images(2), texts(2)
    for a, b in zip(_features(model, x, ids), _features(other, x, ids)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    back = tiny_open_clip(seed=2)
    back.load_state_dict(other.state_dict())
    torch.testing.assert_close(_features(back, x, ids)[0], _features(model, x, ids)[0], atol=1e-6, rtol=0)


def test_unfused_attention_matches_multihead_attention_directly():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    with torch.no_grad():
        mha.in_proj_bias.normal_()
    twin = UnfusedAttention.from_module(mha)
    assert twin.in_proj_weight is mha.in_proj_weight and twin.out_proj is mha.out_proj
    x = torch.randn(2, 5, 32)
    mask = torch.full((5, 5), float("-inf")).triu(1)
    with torch.no_grad():
        ref, ref_w = mha(x, x, x, need_weights=True, attn_mask=mask)
        out, w = twin(x, x, x, need_weights=True, attn_mask=mask)
        bool_out, _ = twin(x, x, x, attn_mask=mask.isinf())
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(w, ref_w, atol=1e-6, rtol=0)
    torch.testing.assert_close(bool_out, ref, atol=1e-6, rtol=0)


def _fused_modules(model):
    return [b.attn for b in list(model.visual.transformer.resblocks) + list(model.transformer.resblocks)]


def test_runs_leave_the_model_as_it_was():
    model = tiny_open_clip()
    before = _fused_modules(model)
    m = cp.wrap(model)
    m.run({"images": images(2), "texts": texts(3)}, {"vision.head_out.1[head=2]": cp.Zero()},
          capture=["vision.attn_pattern.*", "text.head_out.*"])
    assert all(a is b for a, b in zip(_fused_modules(model), before))
    assert all(isinstance(a, nn.MultiheadAttention) for a in before)

    class Boom(cp.Zero):
        def apply(self, x, ctx):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        m.run({"images": images(2)}, {"vision.attn_pattern.0": Boom()})
    assert all(a is b for a, b in zip(_fused_modules(model), before))
    for module in model.modules():  # no hook is left behind, not even on the shared out_proj
        assert not module._forward_hooks and not module._forward_pre_hooks


def test_twins_share_the_weights_of_the_users_model():
    model = tiny_open_clip()
    m = cp.wrap(model)
    x = images(2)
    first = m.run({"images": x}).output
    with torch.no_grad():  # edit the fused module in place: the next run sees it
        model.visual.transformer.resblocks[1].attn.in_proj_weight.mul_(0.5)
    second = m.run({"images": x}).output
    torch.testing.assert_close(second, model.encode_image(x).detach(), atol=1e-5, rtol=0)
    assert not torch.allclose(first, second)


def test_wrap_of_an_unfused_copy_swaps_nothing():
    model = unfuse(tiny_open_clip())
    m = cp.wrap(model)
    before = _fused_modules(model)
    out = m.run({"images": images(2), "texts": texts(3)}, capture=["vision.attn_pattern.0"])
    assert all(a is b for a, b in zip(_fused_modules(model), before))
    ref = tiny_open_clip()
    torch.testing.assert_close(out.output, cp.wrap(ref).run({"images": images(2), "texts": texts(3)}).output)
