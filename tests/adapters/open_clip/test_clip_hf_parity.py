"""HuggingFace CLIPModel under the same site names, and agreement with open_clip on copied weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import crosspatch as cp
from clip_models import images, texts, tiny_open_clip
from crosspatch.adapters.open_clip import to_transformers
from crosspatch.methods import cross_modal

TOWER_FAMILIES = ("embed", "resid_pre", "attn_pattern", "head_out", "attn_out", "resid_mid", "mlp_act", "mlp_out", "resid_post")


@pytest.fixture(scope="module")
def pair():
    model = tiny_open_clip()
    return cp.wrap(model), cp.wrap(to_transformers(model))


def test_hf_clip_is_served_by_the_transformers_adapter_with_the_same_families(pair):
    oc, hf = pair
    assert hf.adapter.name == "transformers" and type(hf.module).__name__ == "CLIPModel"
    assert [f.name for f in hf.catalog] == [f.name for f in oc.catalog]
    for a, b in zip(oc.catalog, hf.catalog):
        assert a.axis_names == b.axis_names and a.layers == b.layers, a.name
        for x, y in zip(a.axes, b.axes):
            # the HuggingFace text tower takes any length up to its maximum; open_clip pads to it
            assert x.size == y.size or (a.name.startswith("text.") and y.size is None), (a.name, x, y)


def test_every_site_agrees_on_copied_weights(pair):
    oc, hf = pair
    sites = [f"{t}.embed" for t in ("vision", "text")]
    sites += [f"{t}.{f}.*" for t in ("vision", "text") for f in TOWER_FAMILIES if f != "embed"]
    sites += ["image_embed", "text_embed", "logits"]
    inputs = {"images": images(3), "texts": texts(4)}
    a, b = oc.run(inputs, capture=sites), hf.run(inputs, capture=sites)
    assert list(a.cache) == list(b.cache)
    for key in a.cache:
        torch.testing.assert_close(b.cache[key], a.cache[key], atol=2e-5, rtol=1e-5, msg=key)
    torch.testing.assert_close(b.output, a.output, atol=5e-5, rtol=1e-5)
    rows = {**inputs, "rows": "texts"}
    torch.testing.assert_close(hf.run(rows).output, oc.run(rows).output, atol=5e-5, rtol=1e-5)


def test_interventions_agree(pair):
    oc, hf = pair
    inputs = {"images": images(2), "texts": texts(3)}
    edits = {"vision.head_out.0[head=1]": cp.Zero(), "text.attn_pattern.1[head=2]": cp.Scale(0.5),
             "text.mlp_act.0[pos=3]": cp.Zero(), "vision.resid_mid.1[pos=0]": cp.Scale(2.0)}
    torch.testing.assert_close(hf.run(inputs, edits).output, oc.run(inputs, edits).output, atol=5e-5, rtol=1e-5)


def test_one_study_gives_one_answer_on_both_libraries(pair):
    oc, hf = pair
    x, y, a, b = images(3, seed=1), images(3, seed=2), texts(3, seed=1), texts(3, seed=2)
    res = [cross_modal.image_pair_patching(m, x, y, a, b, "vision.head_out.*[head=*]", progress=False) for m in pair]
    np.testing.assert_allclose(res[1].values, res[0].values, atol=1e-4)
    res = [cross_modal.text_pair_patching(m, a, b, x, y, "text.resid_pre.*[pos=*]", progress=False) for m in pair]
    np.testing.assert_allclose(res[1].values, res[0].values, atol=1e-4)
    dec = [cross_modal.decompose_image_embedding(m, x, progress=False) for m in pair]
    assert dec[1].error() < 1e-5 and dec[1].head_error() < 1e-5
    torch.testing.assert_close(dec[1].heads, dec[0].heads, atol=1e-5, rtol=1e-5)


def test_hf_inputs_by_their_own_names(pair):
    _, hf = pair
    x, ids = images(2), texts(2)
    by_alias = hf.run({"pixel_values": x, "input_ids": ids}).output
    torch.testing.assert_close(by_alias, hf.run({"images": x, "texts": ids}).output)
    with torch.no_grad():  # HuggingFace's own forward
        ref = hf.module(input_ids=ids, pixel_values=x).logits_per_image
    torch.testing.assert_close(by_alias, ref, atol=1e-5, rtol=1e-5)
    shorter = hf.run({"texts": ids[:, :8]}).output  # HuggingFace takes shorter captions
    torch.testing.assert_close(shorter, hf.run({"texts": ids}).output, atol=1e-5, rtol=0)
