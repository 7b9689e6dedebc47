"""open_clip sites: the catalog, exact per-head writes, residual identities, writes, rows and towers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import crosspatch as cp
from clip_models import CONTEXT, images, texts, tiny_open_clip
from crosspatch.adapters.open_clip import unfuse

TOWER_FAMILIES = (
    "embed", "resid_pre", "head_in", "attn_pattern", "head_z", "head_out", "attn_out", "resid_mid", "mlp_in", "mlp_act",
    "mlp_out", "resid_post", "logits_in",
)
# The families the sweeps below go through (the receiver inputs have their own tests in test_clip_head_in.py).
LAYERED = ["resid_pre", "attn_pattern", "head_out", "attn_out", "resid_mid", "mlp_act", "mlp_out", "resid_post"]


def every_site(tower: str) -> list[str]:
    return [f"{tower}.embed"] + [f"{tower}.{f}.*" for f in LAYERED]


@pytest.fixture(scope="module")
def model():
    return tiny_open_clip()


@pytest.fixture(scope="module")
def m(model):
    return cp.wrap(model)


def test_catalog_has_both_towers_and_the_outputs(m):
    assert m.adapter.name == "open_clip"
    expected = [f"{t}.{f}" for t in ("vision", "text") for f in TOWER_FAMILIES] + ["image_embed", "text_embed", "logits"]
    assert [f.name for f in m.catalog] == expected
    assert m.catalog.family("vision.head_out").axis_names == ("pos", "head", "dim")
    assert m.catalog.family("vision.attn_pattern").axis_names == ("head", "pos", "key_pos")
    assert m.catalog.family("vision.resid_pre").axis("pos").size == 5  # class token + 2x2 patches
    assert m.catalog.family("text.resid_pre").axis("pos").size == CONTEXT
    assert m.catalog.family("logits").axis_names == ("candidate",)
    sweep = m.catalog.expand("vision.head_out.*[head=*]")
    assert len(sweep) == 8 and str(sweep.sites[-1]) == "vision.head_out.1[head=3]"


def test_outputs_are_open_clips(m, model):
    x, ids = images(3), texts(4)
    run = m.run({"images": x, "texts": ids}, capture=["image_embed", "text_embed"])
    with torch.no_grad():
        image_logits, text_logits = model.get_logits(x, ids)
        torch.testing.assert_close(run.cache["image_embed"], model.encode_image(x), atol=1e-5, rtol=0)
        torch.testing.assert_close(run.cache["text_embed"], model.encode_text(ids), atol=1e-5, rtol=0)
    torch.testing.assert_close(run.output, image_logits, atol=1e-4, rtol=1e-5)
    rows = m.run({"images": x, "texts": ids, "rows": "texts"}).output
    torch.testing.assert_close(rows, text_logits, atol=1e-4, rtol=1e-5)
    assert run.raw.rows == "images" and run.raw.logits.shape == (3, 4)


@pytest.mark.parametrize("variant", [{}, {"ls_init_value": 0.5}, {"qk_norm": True}])
def test_heads_sum_to_the_attention_write_and_residuals_add_up(variant):
    model = tiny_open_clip(**variant)
    m = cp.wrap(model)
    cache = m.capture({"images": images(3), "texts": texts(2)}, every_site("vision") + every_site("text"))
    for tower, blocks in (("vision", model.visual.transformer.resblocks), ("text", model.transformer.resblocks)):
        torch.testing.assert_close(cache[f"{tower}.embed"], cache[f"{tower}.resid_pre.0"])
        for l, block in enumerate(blocks):
            bias = block.attn.out_proj.bias
            gamma = getattr(block.ls_1, "gamma", torch.ones(()))
            heads = cache[f"{tower}.head_out.{l}"]
            torch.testing.assert_close(heads.sum(dim=2) + gamma * bias, cache[f"{tower}.attn_out.{l}"], atol=1e-5, rtol=0)
            pre, mid, post = (cache[f"{tower}.{f}.{l}"] for f in ("resid_pre", "resid_mid", "resid_post"))
            torch.testing.assert_close(mid, pre + cache[f"{tower}.attn_out.{l}"], atol=1e-5, rtol=0)
            torch.testing.assert_close(post, mid + cache[f"{tower}.mlp_out.{l}"], atol=1e-5, rtol=0)
            pattern = cache[f"{tower}.attn_pattern.{l}"]
            torch.testing.assert_close(pattern.sum(-1), torch.ones(pattern.shape[:-1]), atol=1e-5, rtol=0)
    causal = cache["text.attn_pattern.0"]
    assert float(causal.triu(1).abs().max()) == 0.0  # the text tower is causal


def test_head_and_pattern_writes_match_hand_made_edits(model, m):
    x = images(2)
    zeroed = m.run({"images": x}, {"vision.head_out.1[head=2]": cp.Zero()}).output
    ref = unfuse(model)
    with torch.no_grad():
        block = ref.visual.transformer.resblocks[1]
        block.attn.out_proj.weight[:, 16:24] = 0  # head 2 of 4 (d_head 8) reads nothing
        expected = ref.encode_image(x)
    torch.testing.assert_close(zeroed, expected, atol=1e-5, rtol=0)

    halved = m.run({"images": x}, {"vision.attn_pattern.0[head=1]": cp.Scale(0.5)}).output
    copy = unfuse(model)

    def halve_head_1(module, args, pattern):
        pattern = pattern.clone()
        pattern[:, 1] *= 0.5
        return pattern

    copy.visual.transformer.resblocks[0].attn.pattern.register_forward_hook(halve_head_1)
    with torch.no_grad():
        expected = copy.encode_image(x)
    torch.testing.assert_close(halved, expected, atol=1e-5, rtol=0)
    assert (halved - zeroed).abs().max() > 1e-3


def test_patching_the_last_vision_residual_reproduces_the_source_image(m):
    source, target, ids = images(3, seed=1), images(3, seed=2), texts(5)
    want = m.run({"images": source, "texts": ids}).output
    got = m.run({"images": target, "texts": ids}, {"vision.resid_post.1": cp.Patch({"images": source, "texts": ids})}).output
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    base = m.run({"images": target, "texts": ids}).output
    assert (base - want).abs().max() > 1e-2


def test_self_patching_changes_nothing(m):
    inputs = {"images": images(2), "texts": texts(3)}
    clean = m.run(inputs, capture=every_site("vision") + every_site("text") + ["image_embed", "text_embed", "logits"])
    keys = list(clean.cache)
    patched = m.run(inputs, {key: cp.Patch(clean.cache) for key in keys})
    torch.testing.assert_close(patched.output, clean.output, atol=1e-6, rtol=0)


def test_each_tower_runs_alone(m, model):
    x, ids = images(2), texts(3)
    image_only = m.run(x, capture=["vision.resid_post.1"])
    torch.testing.assert_close(image_only.output, model.encode_image(x).detach(), atol=1e-5, rtol=0)
    text_only = m.run({"texts": ids})
    torch.testing.assert_close(text_only.output, model.encode_text(ids).detach(), atol=1e-5, rtol=0)
    with pytest.raises(cp.SiteError, match="never reached"):
        m.run({"images": x}, capture=["text.resid_pre.0"])
    with pytest.raises(ValueError, match="context length"):
        m.run({"texts": ids[:, :5]})
    with pytest.raises(ValueError, match="'rows' is 'texts'"):
        m.run({"images": x, "rows": "texts"})


def test_sweeps_run_on_image_rows_and_on_text_rows(m):
    x, y, ids = images(2, seed=1), images(2, seed=2), texts(4)
    metric = cp.metrics.logit_diff(torch.tensor([0, 1]), torch.tensor([2, 3]))
    res = cp.activation_patching(m, {"images": x, "texts": ids}, {"images": y, "texts": ids},
                                 "vision.head_out.*[head=*]", metric, normalize=True, progress=False)
    assert res.dims == ("layer", "head") and res.values.shape == (2, 4) and np.isfinite(res.values).all()
    full = cp.activation_patching(m, {"images": x, "texts": ids}, {"images": y, "texts": ids},
                                  "vision.resid_post.1", metric, normalize=True, progress=False)
    np.testing.assert_allclose(full.values, 1.0, atol=1e-4)

    a, b = texts(2, seed=5), texts(2, seed=6)
    clean, corrupt = {"texts": a, "images": torch.cat([x, y]), "rows": "texts"}, {"texts": b, "images": torch.cat([x, y]), "rows": "texts"}
    res = cp.activation_patching(m, clean, corrupt, "text.resid_pre.*[pos=*]", metric, progress=False)
    assert res.dims == ("layer", "pos") and res.values.shape == (2, CONTEXT)
    # positions after the end token cannot reach the pooled end token
    np.testing.assert_allclose(res.values[:, 8:], 0.0, atol=1e-6)


def test_device_and_dtype_follow_the_model():
    model = tiny_open_clip(dtype=torch.float64)
    m = cp.wrap(model)
    out = m.run({"images": images(2), "texts": texts(2)}, capture=["vision.head_out.0"])
    assert out.output.dtype == torch.float64 and out.cache["vision.head_out.0"].dtype == torch.float64
    with torch.no_grad():
        ref = model.get_logits(images(2).double(), texts(2))[0]
    torch.testing.assert_close(out.output, ref, atol=1e-10, rtol=0)
