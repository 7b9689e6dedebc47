"""Several images per row (``VLMAdapter(images_per_row=2)``) on tiny LLaVA and Idefics3: conformance, the tower's
sites per image against the tower run on that image alone, and the per-image groups against the model's own
merge of image features."""

from __future__ import annotations

import pytest
import torch

import crosspatch as cp
from crosspatch.adapters.vlm import VLMAdapter

from .tiny import tiny_idefics3, tiny_llava

K = 2


@pytest.fixture(scope="module", params=["llava", "idefics3"])
def m(request):
    model = (tiny_llava(num_hidden_layers=2) if request.param == "llava" else tiny_idefics3()).double()
    return cp.wrap(model, VLMAdapter(images_per_row=K))


def test_conforms(m):
    from crosspatch.testing import assert_conforms

    assert_conforms(m.module, m.adapter.example_inputs(m.module), VLMAdapter(images_per_row=K))
    assert m.sites().family("vision.resid_pre").axis_names[0] == "image"
    oracles = m.adapter.family_oracles(m.module)
    assert set(oracles) == {"vision.head_out", "head_out", "embed"} and all(w is None for _, w in oracles.values()), oracles


def test_vision_sites_are_each_image_alone(m):
    """vision.resid_pre.1[image=i] of row r is block 0's output for image i of row r run through the tower alone."""
    raw = m.adapter.example_inputs(m.module)
    inp = m.prepare(raw)
    got = m.run(inp, capture=["vision.resid_pre.1"]).cache["vision.resid_pre.1"]
    tower = m.module.model.vision_tower if hasattr(m.module.model, "vision_tower") else m.module.model.vision_model
    pixels = inp["pixel_values"]
    assert got.shape[:2] == (2, K)
    for r in range(2):
        for i in range(K):
            with torch.no_grad():
                alone = tower(pixel_values=pixels[r, i:i + 1], output_hidden_states=True).hidden_states[1]
            torch.testing.assert_close(got[r, i], alone[0], rtol=0, atol=1e-12)


def test_image_groups_are_where_each_image_lands(m):
    """Changing image i of every row changes ``embed`` exactly at the group ``image<i>``; the processor's flat
    pixel_values [rows * k, 3, H, W] give the same run as [rows, k, 3, H, W]."""
    raw = m.adapter.example_inputs(m.module)
    base = m.prepare(raw)
    plain = m.run(base, capture=["embed"]).cache["embed"]
    for i in range(K):
        pixels = base["pixel_values"].clone()
        pixels[:, i] = torch.randn_like(pixels[:, i])
        moved = m.run(m.prepare({**raw, "pixel_values": pixels}), capture=["embed"]).cache["embed"]
        assert torch.equal((moved - plain).abs().amax(-1) > 0, base[f"group.image{i}"])
    flat = m.prepare({**raw, "pixel_values": base["pixel_values"].flatten(0, 1)})
    assert torch.equal(m.run(flat).output, m.run(base).output)
    with pytest.raises(ValueError, match="2 images a row"):
        m.prepare({**raw, "pixel_values": base["pixel_values"][:, :1]})
