"""The shapes-vlm study's pieces on a briefly trained small shapes-vlm: group names in sweep patterns, image-pair
patching against its exact ends (all image tokens at layer 0 restore everything; the last token's final residual
restores everything; the last token's embedding restores nothing), and knockout of every image edge making the
answer independent of the image."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

import crosspatch as cp  # noqa: E402
from crosspatch.adapters.vlm import VLMAdapter  # noqa: E402
from crosspatch.adapters.vlm import zoo as vlm_zoo  # noqa: E402
from crosspatch.adapters.vlm.shapes_study import flow_by_question, image_pair_patching, question_prompts, subset  # noqa: E402
from crosspatch.methods.vlm_flow import cross_modal_flow  # noqa: E402
from crosspatch.sites.selection import group_patterns  # noqa: E402
from crosspatch.sites.site import Site, SiteError  # noqa: E402

SMALL = replace(vlm_zoo.RECIPE, text_layers=3, batch_size=48, pool=2000, tower_steps=20)


@pytest.fixture(scope="module")
def trained():
    model, tok, _ = vlm_zoo.train(SMALL, seed=0, steps=40, progress=False)
    return cp.wrap(model.double(), VLMAdapter()), tok


def test_group_names_resolve_in_sweep_patterns(trained):
    m, tok = trained
    inputs = m.prepare(question_prompts(m, tok, "colour", 4).prompts.inputs)
    image = Site.parse(group_patterns("resid_pre.*[pos=image]", inputs))
    assert image.family == "resid_pre" and image.layer == "*" and dict(image.sel)["pos"] == tuple(range(1, 17))
    question, plain = group_patterns(["head_out.1[pos=question]", "mlp_out.0"], inputs)
    assert dict(Site.parse(question).sel)["pos"] == tuple(range(17, 22)) and plain == "mlp_out.0"
    sweep = m.catalog.expand(group_patterns("resid_pre.*[pos=image]", inputs), m.adapter.sizes(inputs))
    assert [s.layer for s in sweep.sites] == [0, 1, 2]
    padded = dict(inputs)
    padded["group.image"] = inputs["group.image"].clone()
    padded["group.image"][0] = torch.roll(padded["group.image"][0], 1)  # row 0 one column later
    with pytest.raises(SiteError, match="align the rows"):
        group_patterns("resid_pre.*[pos=image]", padded)


def test_sweeps_take_group_names_directly(trained):
    """activation_patching and attribution_patching resolve group names themselves: the same values as the
    pattern with the group's columns written out."""
    m, tok = trained
    clean = question_prompts(m, tok, "colour", 4, seed=1).prompts.inputs
    corrupt = question_prompts(m, tok, "colour", 4, seed=2).prompts.inputs
    metric = lambda out, ctx: out[:, -1].log_softmax(-1)[:, 5]  # noqa: E731
    written = group_patterns(["resid_pre.*[pos=image]", "mlp_out.*[pos=question]"], m.prepare(clean))
    for method in (cp.activation_patching, cp.attribution_patching):
        named = method(m, clean, corrupt, ["resid_pre.*[pos=image]", "mlp_out.*[pos=question]"], metric)
        explicit = method(m, clean, corrupt, written, metric)
        np.testing.assert_array_equal(named.values, explicit.values)
        assert np.abs(named.values).max() > 0
    from crosspatch.scale.executors import LocalExecutor

    sharded = cp.activation_patching(m, clean, corrupt, ["resid_pre.*[pos=image]", "mlp_out.*[pos=question]"], metric,
                                     executor=LocalExecutor(sites_per_shard=2))
    np.testing.assert_allclose(sharded.values, cp.activation_patching(m, clean, corrupt, written, metric).values,
                               rtol=0, atol=1e-9)


def test_image_pair_patching_meets_its_exact_ends(trained):
    m, tok = trained
    sites = {"image": "resid_pre.*[pos=image]", "last": "resid_pre.*[pos=last]", "out": "resid_post.*[pos=last]"}
    result = image_pair_patching(m, tok, "colour", n=12, sites=sites)
    assert result.dims == ("site", "layer") and result.values.shape == (3, 3)
    image, last, out = result.values
    np.testing.assert_allclose(image[0], 1.0, atol=1e-9)  # the text is the same: image tokens at block 0 are all
    assert last[0] == 0.0  # the last token's embedding is the same in both runs
    np.testing.assert_allclose(out[-1], 1.0, atol=1e-9)  # the logits read the last residual only
    assert result.metadata["factor"] == "colour" and result.metadata["pairs"] == 12


def test_blocking_every_image_edge_makes_the_answer_blind(trained):
    m, tok = trained
    items = question_prompts(m, tok, "shape", 6).prompts
    token = items.answer[:1].expand(6)  # one answer token for every item
    edges = {"image -> text": ("image", "text")}
    flow = cross_modal_flow(m, items.inputs, edges, window=2 * 3, answers=token, n_boot=50)
    prepared = m.prepare(items.inputs)
    plain = m.run(prepared, capture=["attn_pattern.0"]).output[:, -1].softmax(-1)
    p_plain = plain[torch.arange(6), token].numpy()
    blocked = p_plain * (1 + flow.per_item[0] / 100)  # [windows, items]; every window covers all 3 layers
    np.testing.assert_allclose(blocked, blocked[0, 0], rtol=1e-9)
    assert np.ptp(p_plain) > 1e-3  # while the plain run does see the image


def test_flow_by_question_keeps_the_rows_answered_right(trained):
    m, tok = trained
    qp = question_prompts(m, tok, "left", 16, seed=2)
    assert 0 < int(qp.correct.sum()) < 16 or qp.accuracy == 1.0
    flows = flow_by_question(m, tok, 16, window=1, seed=2, n_boot=50, questions=("left",))
    flow = flows["left"]
    assert flow.metadata["n_items"] == int(qp.correct.sum()) and flow.change.shape == (3, 3)
    direct = cross_modal_flow(m, subset(qp.prompts.inputs, qp.correct), window=1,
                              answers=qp.prompts.answer[qp.correct], n_boot=50, seed=2)
    np.testing.assert_array_equal(flow.per_item, direct.per_item)
