"""LLaVA-NeXT (anyres) through the vlm adapter: conformance, and the crop groups against the model's own
computation (changing one crop's pixels moves the merged embeddings exactly at that crop's group)."""

from __future__ import annotations

import pytest
import torch

import crosspatch as cp
from crosspatch.adapters.vlm import VLMAdapter, llava_next
from crosspatch.adapters.vlm.tiny import tiny_model, tiny_vlm
from crosspatch.engine.knockout import Knockout, bind
from crosspatch.sites.site import SiteError
from crosspatch.testing import assert_conforms

from conftest import randomize


@pytest.fixture(scope="module", params=["llava_next", "llava_onevision"])
def m(request):
    """LLaVA-NeXT (16-pixel crops, grids 1 x 2, 2 x 1, 2 x 2) and LLaVA-OneVision (built from its shrunk config:
    32-pixel crops, the same grids), which packs its crops the same way."""
    model = tiny_model("llava_next") if request.param == "llava_next" else tiny_vlm("llava_onevision")
    return cp.wrap(randomize(model).double(), VLMAdapter())


def inputs(m, size=(1, 2), seed=0, rows=2) -> dict:
    """``[bos, image tokens, 5 words]`` per row, one image of ``size`` (in crops of the tower's size) per row."""
    side = m.module.config.vision_config.image_size
    size = tuple(int(v * side) for v in size)
    n = len(llava_next.token_sources(m.module, size))
    crops = llava_next.crops(m.module, size)
    token = m.module.config.image_token_id
    g = torch.Generator().manual_seed(seed)
    words = torch.randint(3, 60, (rows, 5), generator=g)
    words[words == token] = 3
    ids = torch.cat([torch.ones(rows, 1, dtype=torch.long), torch.full((rows, n), token), words], dim=1)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "image_sizes": torch.tensor([list(size)] * rows),
            "pixel_values": torch.randn(rows, 1 + crops, 3, side, side, generator=g, dtype=torch.float64)}


def test_conforms(m):
    assert_conforms(m.module, inputs(m), VLMAdapter())
    assert {"vision.*", "projector_out"} <= set(m.sites().unavailable)
    assert {"embed", "head_out", "attn_pattern", "logits"} <= set(m.sites().families)
    with pytest.raises(SiteError, match="crop"):
        m.sites().family("projector_out")


@pytest.mark.parametrize("size", [(1, 2), (0.75, 2), (2, 2)])
def test_crop_groups_are_where_each_crop_lands(m, size):
    """Changing the pixels of the whole image (slot 0) or of crop c (slot 1 + c) changes ``embed`` exactly at
    ``image_base`` or ``crop<c>``; newlines never. An image 0.75 x 2 crops is cut to a 1 x 2 grid with padding
    rows unpadded away; 2 x 2 is a 2 x 2 grid."""
    raw = inputs(m, size)
    base = m.prepare(raw)
    plain = m.run(base, capture=["embed"]).cache["embed"]
    slots = raw["pixel_values"].shape[1]
    names = ["image_base"] + [f"crop{c}" for c in range(slots - 1)]
    assert all(base["group." + name].any(1).all() for name in names)
    covered = sum(base["group." + name].long() for name in names + ["image_newline"])
    assert torch.equal(covered.bool(), base["group.image"]) and int(covered.max()) == 1
    for slot, name in enumerate(names):
        pixels = raw["pixel_values"].clone()
        pixels[:, slot] = torch.randn_like(pixels[:, slot])
        moved = m.run(m.prepare({**raw, "pixel_values": pixels}), capture=["embed"]).cache["embed"]
        changed = (moved - plain).abs().amax(-1) > 0
        assert torch.equal(changed, base["group." + name]), name


def test_knocking_out_a_crop_hides_it_from_the_text(m):
    """With crop1 -> every other position knocked out, the text's logits do not depend on crop 1's pixels (crop
    1's rows interleave with crop 0's, so crop1 -> text alone would leave paths through crop 0 and the newlines)."""
    raw = inputs(m)
    other = raw["pixel_values"].clone()
    other[:, 2] = torch.randn_like(other[:, 2])
    outs = []
    for pixels in (raw["pixel_values"], other):
        inp = m.prepare({**raw, "pixel_values": pixels})
        outs.append(m.run(inp, bind(m, inp, [Knockout("crop1", ~inp["group.crop1"])])).output)
    text = m.prepare(raw)["group.text"][0]
    assert torch.equal(outs[0][:, text], outs[1][:, text])
    assert not torch.equal(outs[0], outs[1])


def test_inputs_of_another_shape_are_refused(m):
    raw = inputs(m)
    with pytest.raises(ValueError, match="one image per row"):
        m.prepare({**raw, "image_sizes": torch.stack([raw["image_sizes"][0], raw["image_sizes"][1].flip(0)])})  # 1 x 2, 2 x 1
    with pytest.raises(ValueError, match="image tokens"):  # 2 x 2 crops: more image tokens than the rows hold
        m.prepare({**raw, "image_sizes": raw["image_sizes"].amax(-1, keepdim=True).expand(-1, 2)})


def test_the_tower_over_the_whole_image_and_its_crops(m):
    """VLMAdapter(images_per_row=1 + crops) serves the tower and the projector over [rows, image, ...] (image 0 the
    whole image, image c + 1 crop c): conformance and oracles; vision.resid_pre.1[image=i] is the tower run on that
    crop alone; the merged embeddings at image_base and at crop<c> are projector_out[image=0] and [image=c + 1],
    in order (a 1 x 2 grid: nothing unpadded)."""
    raw = inputs(m)
    k = raw["pixel_values"].shape[1]
    adapter = VLMAdapter(images_per_row=k)
    assert_conforms(m.module, raw, adapter)
    assert all(why is None for _, why in adapter.family_oracles(m.module).values())
    crops = cp.wrap(m.module, adapter)
    inp = crops.prepare(raw)
    cache = crops.run(inp, capture=["vision.resid_pre.1", "projector_out", "embed"]).cache
    tower = m.module.model.vision_tower
    for i in range(k):
        with torch.no_grad():
            alone = tower(pixel_values=inp["pixel_values"][1, i:i + 1], output_hidden_states=True).hidden_states[1]
        torch.testing.assert_close(cache["vision.resid_pre.1"][1, i], alone[0], rtol=0, atol=1e-12)
    for i, name in enumerate(["image_base", "crop0", "crop1"]):
        mask = inp["group." + name]
        assert torch.equal(cache["embed"][mask].view(2, -1, cache["embed"].shape[-1]), cache["projector_out"][:, i])
    with pytest.raises(ValueError, match="1 \\+ crops = 3"):
        crops.prepare({**raw, "pixel_values": raw["pixel_values"][:, :2]})
