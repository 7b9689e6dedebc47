"""Qwen2-VL through the vlm adapter: the language model's families (the vision tower and merger run flat over
all images and are not served), processor-shaped inputs, groups and knockout."""

from __future__ import annotations

import pytest
import torch

import crosspatch as cp
from crosspatch.adapters.vlm import VLMAdapter
from crosspatch.adapters.vlm.tiny import tiny_model
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
    assert "vision.*" in m.sites().unavailable and "projector_out" in m.sites().unavailable
    with pytest.raises(SiteError, match="flat"):
        m.sites().family("projector_out")


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
    assert oracles["head_out"][1] is None
