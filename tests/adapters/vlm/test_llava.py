"""The VLM adapter on a tiny random LLaVA: conformance, the families against the model's own computation,
position groups in selections (against hand-written hooks) and knockout between modalities."""

from __future__ import annotations

import pytest
import torch

import crosspatch as cp
from crosspatch.adapters.vlm import VLMAdapter
from crosspatch.engine.interventions import Zero
from crosspatch.engine.knockout import Knockout, bind
from crosspatch.sites.selection import take_group
from crosspatch.sites.site import SiteError
from crosspatch.testing import assert_conforms

from crosspatch.adapters.transformers.adapter import InferenceWarning

from .tiny import (
    IMAGE_TOKEN, IMAGE_TOKENS, idefics3_inputs, paligemma_inputs, tiny_idefics3, tiny_llava, tiny_paligemma, vlm_inputs,
)


@pytest.fixture(scope="module")
def model():
    return tiny_llava(num_hidden_layers=2).double()


@pytest.fixture(scope="module")
def m(model):
    return cp.wrap(model, VLMAdapter())


def test_conforms(model):
    # Unpadded: at padding positions (every key masked) sdpa and the eager attention that reading patterns
    # switches to give different values, which the passive check would see; real positions agree.
    assert_conforms(model, vlm_inputs(), VLMAdapter())


def test_catalog_has_the_three_parts(m):
    names = set(m.sites().families)
    assert {"vision.head_out", "vision.attn_pattern", "projector_out", "embed", "head_out", "head_in",
            "attn_pattern", "logits"} <= names
    assert "vision.logits_in" not in names  # CLIP's pooled readout is not what the projector reads
    assert m.sites().family("projector_out").axis("pos").size == IMAGE_TOKENS


def test_groups_come_from_the_inputs():
    raw = vlm_inputs(pad=2)
    prepared = VLMAdapter().prepare(tiny_llava(num_hidden_layers=1), raw)
    ids, mask = raw["input_ids"], raw["attention_mask"].bool()
    assert torch.equal(prepared["group.image"], ids.eq(IMAGE_TOKEN))
    assert torch.equal(prepared["group.text"], mask & ids.ne(IMAGE_TOKEN))
    assert prepared["group.last"].sum(1).tolist() == [1, 1] and prepared["group.last"][:, -1].all()
    for r, (start, stop) in enumerate(raw["groups"]["question"]):
        assert prepared["group.question"][r].nonzero().flatten().tolist() == list(range(start, stop))
    with pytest.raises(ValueError, match="built in"):
        VLMAdapter().prepare(tiny_llava(num_hidden_layers=1), {**raw, "groups": {"image": (0, 2)}})


def test_embed_holds_the_projected_image_in_the_image_positions(m, model):
    inp = m.prepare(vlm_inputs(pad=2))
    cache = m.run(inp, capture=["embed", "projector_out"]).cache
    image = inp["group.image"]
    assert torch.equal(take_group(cache["embed"], image), cache["projector_out"])
    tokens = model.model.language_model.embed_tokens(inp["input_ids"])
    assert torch.equal(cache["embed"][~image], tokens[~image])


def test_heads_sum_to_the_attention_output(m, model):
    inp = m.prepare(vlm_inputs())
    cache = m.run(inp, capture=["vision.head_out.1", "vision.attn_out.1", "head_out.1", "attn_out.1"]).cache
    bias = model.model.vision_tower.encoder.layers[1].self_attn.out_proj.bias
    torch.testing.assert_close(cache["vision.head_out.1"].sum(2) + bias, cache["vision.attn_out.1"], rtol=0, atol=1e-12)
    torch.testing.assert_close(cache["head_out.1"].sum(2), cache["attn_out.1"], rtol=0, atol=1e-12)


def _zero_hook(module, columns):
    """A hand-written hook zeroing the block input at ``columns[r]`` of each row ``r``."""
    def hook(mod, args, kwargs):
        x = kwargs["hidden_states"].clone() if "hidden_states" in kwargs else args[0].clone()
        for r, cols in enumerate(columns):
            x[r, cols] = 0
        if "hidden_states" in kwargs:
            return args, {**kwargs, "hidden_states": x}
        return (x, *args[1:]), kwargs
    return module.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("group", ["image", "question", "last"])
def test_a_group_in_a_selection_equals_a_hand_hook(m, model, group):
    """Rows whose group sits in different columns (left padding) are bound row by row."""
    inp = m.prepare(vlm_inputs(pad=2))
    columns = [row.nonzero().flatten().tolist() for row in inp[f"group.{group}"]]
    got = m.run(inp, bind(m, inp, {f"resid_pre.1[pos={group}]": Zero()})).output
    handle = _zero_hook(model.model.language_model.layers[1], columns)
    try:
        with torch.no_grad():
            expected = VLMAdapter().forward(model, inp).logits
    finally:
        handle.remove()
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_a_head_at_a_group(m):
    inp = m.prepare(vlm_inputs())  # same columns in every row: one site for all rows
    (bound,) = bind(m, inp, {"head_out.1[head=2,pos=question]": Zero()})
    assert bound.rows is None and bound.site.selection["pos"] == tuple(range(18, 24))
    cache = m.run(inp, [bound], capture=["head_out.1"]).cache
    assert cache["head_out.1"][:, 18:24, 2].abs().max() == 0
    assert cache["head_out.1"][:, :18, 2].abs().min() > 0
    with pytest.raises(SiteError, match="no position group 'answer'"):
        bind(m, inp, {"resid_pre.1[pos=answer]": Zero()})


def test_knocking_out_image_to_text_hides_the_image_from_the_text():
    """With every edge image -> text blocked in every layer, text positions cannot see the image: their logits
    are the same for two different images (bit for bit), while image positions, and the plain runs, differ."""
    model = tiny_llava(num_hidden_layers=2).double()
    m = cp.wrap(model, VLMAdapter())
    a = vlm_inputs(seed=1)
    b = {**a, "pixel_values": torch.randn(a["pixel_values"].shape, generator=torch.Generator().manual_seed(9))}
    runs = {}
    for name, raw in (("a", a), ("b", b)):
        inp = m.prepare(raw)
        runs[name] = m.run(inp, bind(m, inp, [Knockout("image", "text")])).output
        runs[name + "_plain"] = m.run(inp).output
    text = m.prepare(a)["group.text"][0]
    assert torch.equal(runs["a"][:, text], runs["b"][:, text])
    assert not torch.allclose(runs["a"][:, ~text], runs["b"][:, ~text])
    assert not torch.allclose(runs["a_plain"][:, text], runs["b_plain"][:, text])


def test_vision_knockout_uses_the_vision_patterns(m):
    """Knockout on the vision tower's patterns: the class token attending only to itself in block 0."""
    inp = m.prepare(vlm_inputs())
    others = torch.ones(17, dtype=torch.bool)
    others[0] = False
    dst = torch.zeros(17, dtype=torch.bool)
    dst[0] = True
    ko = Knockout(others, dst, layers=0, family="vision.attn_pattern")
    cache = m.run(inp, bind(m, inp, [ko]), capture=["vision.attn_pattern.0"]).cache
    assert torch.equal(cache["vision.attn_pattern.0"][:, :, 0, 0], torch.ones(2, 4, dtype=torch.float64))


# PaliGemma: SigLIP tower (no class token), Gemma LM whose prefix (image + prompt) attends both ways -------------


@pytest.fixture(scope="module")
def paligemma():
    return cp.wrap(tiny_paligemma().double(), VLMAdapter())


@pytest.mark.filterwarnings("ignore::crosspatch.adapters.transformers.adapter.InferenceWarning")  # the copies the suite makes
def test_paligemma_conforms(paligemma):
    assert_conforms(paligemma.module, paligemma_inputs(), VLMAdapter())
    assert "attn_pattern" in paligemma.sites() and "head_in" in paligemma.sites()  # Gemma's (1 + w) RMSNorm


def test_paligemma_prefix_attends_both_ways(paligemma, m):
    """Image queries attend to the prompt after them (prefix), answer tokens only backwards; so knocking out
    question -> image changes PaliGemma's image positions, and is bit for bit nothing in causal LLaVA."""
    inp = paligemma.prepare(paligemma_inputs())
    pattern = paligemma.run(inp, capture=["attn_pattern.0"]).cache["attn_pattern.0"]
    image, question, suffix = (inp[f"group.{g}"][0] for g in ("image", "question", "suffix"))
    assert (pattern[:, :, image][..., question] > 0).all()
    first_answer = int(suffix.nonzero()[0])
    assert (pattern[:, :, first_answer, first_answer + 1:] == 0).all()
    same = ["attn_pattern.*"]
    plain = paligemma.run(inp, capture=same).output
    knocked = paligemma.run(inp, bind(paligemma, inp, [Knockout("question", "image")])).output
    assert not torch.allclose(knocked[:, image], plain[:, image])
    llava_inp = m.prepare(vlm_inputs())
    assert torch.equal(m.run(llava_inp, bind(m, llava_inp, [Knockout("question", "image")])).output,
                       m.run(llava_inp, capture=same).output)


# Idefics3 (SmolVLM): SigLIP-style tower, pixel-shuffle connector, pixel_values [rows, images, 3, H, W] ---------


@pytest.fixture(scope="module")
def idefics3():
    return cp.wrap(tiny_idefics3().double(), VLMAdapter())


def test_idefics3_conforms(idefics3):
    assert_conforms(idefics3.module, idefics3_inputs(), VLMAdapter())
    assert idefics3.sites().family("projector_out").axis("pos").size == 4  # 16 patches folded 2 x 2


def test_idefics3_families_against_the_model(idefics3):
    model = idefics3.module
    inp = idefics3.prepare({**idefics3_inputs(), "pixel_values": idefics3_inputs()["pixel_values"][:, 0]})  # [rows, 3, H, W] too
    assert inp["pixel_values"].shape == (2, 1, 3, 16, 16)
    cache = idefics3.run(inp, capture=["embed", "projector_out", "vision.head_out.0", "vision.attn_out.0"]).cache
    assert torch.equal(take_group(cache["embed"], inp["group.image"]), cache["projector_out"])
    bias = model.model.vision_model.encoder.layers[0].self_attn.out_proj.bias
    torch.testing.assert_close(cache["vision.head_out.0"].sum(2) + bias, cache["vision.attn_out.0"], rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="one image per row"):
        idefics3.prepare({**idefics3_inputs(), "pixel_values": torch.randn(2, 2, 3, 16, 16)})


def test_llava_reading_an_inner_vision_layer():
    """vision_feature_layer=-2 (real LLaVA checkpoints): the last vision block never reaches the output, so the
    vision families stop before it; the rest conforms, and writing a served block's output reaches the logits."""
    model = tiny_llava(num_hidden_layers=2, vision_layers=3, vision_feature_layer=-2).double()
    m = cp.wrap(model, VLMAdapter())
    assert m.sites().family("vision.resid_post").layers == 2
    assert_conforms(model, vlm_inputs(), VLMAdapter())
    inp = m.prepare(vlm_inputs())
    assert not torch.allclose(m.run(inp, {"vision.resid_post.1": Zero()}).output, m.run(inp).output)


@pytest.mark.parametrize("kind", ["llava", "paligemma", "idefics3"])
@pytest.mark.filterwarnings("ignore::crosspatch.adapters.transformers.adapter.InferenceWarning")
def test_verify_builds_and_checks_each_kind(kind):
    """What ``crosspatch verify --config KIND --adapter vlm`` runs: the tiny model, its example inputs, the oracles."""
    adapter = VLMAdapter()
    model = adapter.tiny_model(kind)
    oracles = adapter.family_oracles(model)
    assert set(oracles) == {"vision.head_out", "head_out", "embed"}
    assert all(failure is None for _, failure in oracles.values()), oracles
    assert cp.wrap(model, adapter).run(adapter.example_inputs(model)).output.shape[-1] == 64
    with pytest.raises(ValueError, match="kinds: llava"):
        adapter.tiny_model("qwen3_vl")


def test_patching_the_image_positions_swaps_the_image(m):
    """Two inputs that differ only in the image. Patching embed[pos=image] from the second run into the first
    gives the second's logits (the text reads the image through those positions only). Patching resid_pre.1 at
    the image positions gives the second's logits there (they read earlier text, the same in both), while the
    last token, which read the first image in block 0, keeps a difference."""
    from crosspatch.engine.interventions import Patch

    a = vlm_inputs(seed=1)
    b = {**a, "pixel_values": torch.randn(a["pixel_values"].shape, generator=torch.Generator().manual_seed(4))}
    inp_a, inp_b = m.prepare(a), m.prepare(b)
    source = m.run(inp_b, capture=["embed", "resid_pre.1"])
    patched = m.run(inp_a, bind(m, inp_a, {"embed[pos=image]": Patch(source.cache)})).output
    torch.testing.assert_close(patched, source.output, rtol=0, atol=1e-12)
    later = m.run(inp_a, bind(m, inp_a, {"resid_pre.1[pos=image]": Patch(source.cache)})).output
    image = inp_a["group.image"][0]
    torch.testing.assert_close(later[:, image], source.output[:, image], rtol=0, atol=1e-12)
    assert not torch.allclose(later[:, -1], source.output[:, -1])


def test_wrap_finds_the_vlm_adapter_before_the_transformers_one(model):
    """A LLaVA model is a transformers model too: the VLM adapter is marked specific and asked first."""
    from crosspatch.adapters.transformers.adapter import TransformersAdapter

    assert TransformersAdapter().matches(model)
    assert cp.wrap(model).adapter.name == "vlm"


def test_run_takes_group_sites_and_knockouts_directly(m, model):
    """``m.run`` resolves ``pos=image`` and Knockout items as ``bind`` does: the same output."""
    inputs = vlm_inputs()
    prepared = m.prepare(inputs)
    items = {"resid_pre.1[pos=image]": Zero()}
    direct = m.run(inputs, items).output
    assert torch.equal(direct, m.run(inputs, bind(m, prepared, items)).output)
    assert not torch.equal(direct, m.run(inputs).output)
    knock = [Knockout(src="image", dst="last", layers=[0, 1])]
    assert torch.equal(m.run(inputs, knock).output, m.run(inputs, bind(m, prepared, knock)).output)
    with pytest.raises(SiteError, match="no position group 'nope'"):
        m.run(inputs, {"resid_pre.1[pos=nope]": Zero()})
