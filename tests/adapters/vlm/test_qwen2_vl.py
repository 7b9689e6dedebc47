"""Qwen2-VL through the vlm adapter: the vision tower and merger (flat over all images, shown one image per row)
against hand-written hooks and computations, the language model's families, processor-shaped inputs, groups
and knockout."""

from __future__ import annotations

import pytest
import torch

import crosspatch as cp
from crosspatch.adapters.vlm import VLMAdapter
from crosspatch.adapters.vlm import qwen2_vl
from crosspatch.adapters.vlm.tiny import tiny_model
from crosspatch.engine.interventions import Zero
from crosspatch.engine.knockout import Knockout, bind
from crosspatch.sites.site import SiteError
from crosspatch.testing import assert_conforms

from conftest import randomize


@pytest.fixture(scope="module")
def m():
    return cp.wrap(randomize(tiny_model("qwen2_vl")).double(), VLMAdapter())


def processor_inputs(m, seed: int = 0) -> dict:
    """What the processor returns: flat pixel_values [patches of every image, features], one grid per image."""
    ex = VLMAdapter().example_inputs(m.module)
    g = torch.Generator().manual_seed(seed)
    flat = torch.randn(ex["pixel_values"].shape[0] * ex["pixel_values"].shape[1], ex["pixel_values"].shape[2], generator=g)
    return {**ex, "pixel_values": flat.double(), "groups": {"question": (7, 12)}}


def test_conforms(m):
    assert_conforms(m.module, processor_inputs(m), VLMAdapter())
    names = set(m.sites().families)
    assert {"vision.embed", "vision.attn_pattern", "vision.head_out", "vision.resid_post", "projector_out"} <= names
    assert set(m.sites().unavailable) == {"vision.head_in"}
    with pytest.raises(SiteError, match="fused qkv"):
        m.sites().family("vision.head_in")


def test_processor_inputs_run_row_by_row(m):
    """Flat pixel_values become [rows, patches, features]; each row alone gives the batched row's logits."""
    raw = processor_inputs(m)
    inp = m.prepare(raw)
    assert inp["pixel_values"].shape == (2, 16, 96) and inp["group.image"].sum(1).tolist() == [4, 4]
    batched = m.run(inp).output
    for r in range(2):
        one = {k: v[r:r + 1] for k, v in inp.items()}
        torch.testing.assert_close(m.run(one).output, batched[r:r + 1], rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="one image per row"):
        m.prepare({**raw, "image_grid_thw": torch.tensor([[1, 4, 4], [1, 2, 8]])})


def test_knocking_out_image_to_text_hides_the_image(m):
    a = processor_inputs(m, seed=0)
    b = processor_inputs(m, seed=1)
    outs = []
    for raw in (a, b):
        inp = m.prepare(raw)
        outs.append((m.run(inp, bind(m, inp, [Knockout("image", "text")])).output, m.run(inp).output))
    text = m.prepare(a)["group.text"][0]
    assert torch.equal(outs[0][0][:, text], outs[1][0][:, text])
    assert not torch.allclose(outs[0][1][:, text], outs[1][1][:, text])


def test_verify_kind():
    adapter = VLMAdapter()
    oracles = adapter.family_oracles(adapter.tiny_model("qwen2_vl"))
    assert set(oracles) == {"head_out", "vision.head_out", "embed"}
    assert all(why is None for _, why in oracles.values()), oracles


def _flat_hook(module, value_at):
    """A hand-written forward pre-hook replacing the flat input [rows * patches, d] of ``module`` by ``value_at(x)``."""
    return module.register_forward_pre_hook(lambda mod, args: (value_at(args[0]), *args[1:]))


def test_vision_sites_are_the_flat_tower_split_into_rows(m):
    """vision.resid_pre.1[patch=3] zeroed equals a hand hook zeroing flat positions r * 16 + 3 of block 1's input;
    vision.embed and projector_out equal the tower's own patch embeddings and merger output, row-major."""
    inp = m.prepare(processor_inputs(m))
    visual = m.module.model.visual
    got = m.run(inp, {"vision.resid_pre.1[patch=3]": Zero()}).output

    def zero(x):
        x = x.clone()
        x[[3, 16 + 3]] = 0
        return x

    handle = _flat_hook(visual.blocks[1], zero)
    try:
        with torch.no_grad():
            want = m.module(**qwen2_vl.model_inputs(inp), use_cache=False).logits
    finally:
        handle.remove()
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not torch.equal(got, m.run(inp).output)
    cache = m.run(inp, capture=["vision.embed", "projector_out", "embed"]).cache
    with torch.no_grad():
        out = visual(inp["pixel_values"].reshape(32, -1), grid_thw=inp["image_grid_thw"])
    assert torch.equal(cache["vision.embed"], visual.patch_embed(inp["pixel_values"].reshape(32, -1)).view(2, 16, -1))
    assert torch.equal(cache["projector_out"], out.pooler_output.view(2, 4, -1))
    assert torch.equal(cache["embed"][inp["group.image"]].view(2, 4, -1), cache["projector_out"])


def test_vision_heads_are_exact(m):
    """Heads + the proj bias sum to attn_out; each head's pattern times its values (computed by hand from
    vision.resid_pre through norm1 and qkv, rotary applied) is its head_z in a plain (sdpa) run, per image."""
    inp = m.prepare(processor_inputs(m))
    blk = m.module.model.visual.blocks[1]
    keys = ["vision.head_out.1", "vision.attn_out.1", "vision.head_z.1", "vision.resid_pre.1"]
    plain = m.run(inp, capture=keys).cache
    torch.testing.assert_close(plain["vision.head_out.1"].sum(2) + blk.attn.proj.bias, plain["vision.attn_out.1"],
                               rtol=0, atol=1e-12)
    pattern = m.run(inp, capture=["vision.attn_pattern.1"]).cache["vision.attn_pattern.1"]  # [2, 4, 16, 16]
    torch.testing.assert_close(pattern.sum(-1), torch.ones(2, 4, 16, dtype=pattern.dtype), rtol=0, atol=1e-12)
    with torch.no_grad():
        values = blk.attn.qkv(blk.norm1(plain["vision.resid_pre.1"])).view(2, 16, 3, 4, 8)[:, :, 2]  # [row, patch, head, d]
    z = torch.einsum("rhqk,rkhd->rqhd", pattern, values)
    torch.testing.assert_close(z, plain["vision.head_z.1"], rtol=0, atol=1e-12)


def test_a_vision_head_patch_equals_a_hand_hook(m):
    """Patching vision.head_out.0[head=2] from another image's run equals a hand hook putting the source's slice
    of head 2 into the proj input of block 0; the other heads are untouched."""
    from crosspatch.engine.interventions import Patch

    base, source = m.prepare(processor_inputs(m, seed=0)), m.prepare(processor_inputs(m, seed=1))
    proj = m.module.model.visual.blocks[0].attn.proj
    seen = []
    handle = proj.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
    try:
        cache = m.run(source, capture=["vision.head_out.0"]).cache
    finally:
        handle.remove()
    got = m.run(base, {"vision.head_out.0[head=2]": Patch(cache)}).output

    def put(x):
        x = x.clone()
        x[:, 16:24] = seen[0][:, 16:24]
        return x

    handle = _flat_hook(proj, put)
    try:
        with torch.no_grad():
            want = m.module(**qwen2_vl.model_inputs(base), use_cache=False).logits
    finally:
        handle.remove()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert (got - m.run(base).output).abs().max() > 1e-6


def test_windowed_patterns_of_qwen2_5_vl():
    """Qwen2.5-VL with 4 windows per image (8 x 8 patches, windows of 4 x 4, every block windowed): conformance;
    the pattern is 0 outside each query's window and, times the values computed by hand, equals head_z of a
    plain run, where the model attends window by window itself."""
    from crosspatch.adapters.vlm.tiny import tiny_vlm

    model = randomize(tiny_vlm("qwen2_5_vl", vision={"window_size": 32})).double()
    m = cp.wrap(model, VLMAdapter())
    raw = qwen2_vl.example_inputs(model, grid=8)
    assert_conforms(model, raw, VLMAdapter())
    inp = m.prepare(raw)
    blk = model.model.visual.blocks[0]
    plain = m.run(inp, capture=["vision.head_z.0", "vision.resid_pre.0"]).cache
    pattern = m.run(inp, capture=["vision.attn_pattern.0"]).cache["vision.attn_pattern.0"]  # [2, 4, 64, 64]
    heads = model.config.vision_config.num_heads
    kept = (pattern[0, 0] > 0).sum(-1)
    assert kept.tolist() == [16] * 64  # each patch sees the 16 patches of its window
    with torch.no_grad():
        values = blk.attn.qkv(blk.norm1(plain["vision.resid_pre.0"])).view(2, 64, 3, heads, -1)[:, :, 2]
    z = torch.einsum("rhqk,rkhd->rqhd", pattern, values)
    torch.testing.assert_close(z, plain["vision.head_z.0"], rtol=0, atol=1e-12)


def test_two_images_per_row(m):
    """VLMAdapter(images_per_row=2) on Qwen2-VL: conformance and oracles; vision.embed[image=i] of row r is the
    patch embedding of that image's pixels; changing image i of every row moves embed exactly at image<i>."""
    adapter = VLMAdapter(images_per_row=2)
    raw = qwen2_vl.example_inputs(m.module, images=2)
    raw = {**raw, "pixel_values": raw["pixel_values"].double()}
    assert_conforms(m.module, raw, adapter)
    two = cp.wrap(m.module, adapter)
    assert all(why is None for _, why in adapter.family_oracles(m.module).values())
    inp = two.prepare(raw)
    assert inp["pixel_values"].shape == (2, 32, 96) and inp["image_grid_thw"].shape == (2, 2, 3)
    cache = two.run(inp, capture=["vision.embed", "embed", "projector_out"]).cache
    assert cache["vision.embed"].shape == (2, 2, 16, 32) and cache["projector_out"].shape == (2, 2, 4, 32)
    with torch.no_grad():
        alone = m.module.model.visual.patch_embed(inp["pixel_values"][1, 16:])  # row 1, image 1
    torch.testing.assert_close(cache["vision.embed"][1, 1], alone, rtol=0, atol=0)
    for i in range(2):
        pixels = inp["pixel_values"].clone()
        pixels[:, 16 * i:16 * (i + 1)] = torch.randn_like(pixels[:, :16])
        moved = two.run(two.prepare({**raw, "pixel_values": pixels}), capture=["embed"]).cache["embed"]
        assert torch.equal((moved - cache["embed"]).abs().amax(-1) > 0, inp[f"group.image{i}"])
