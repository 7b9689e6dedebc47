"""Attention knockout inside vision towers (``Knockout(..., family="vision.attn_pattern")``): Qwen2-VL's tower,
whose pattern is ``[head, patch, key_patch]``, and LLaVA's CLIP tower, against a hand hook on the layer's
attention that sets the blocked scores to minus infinity before the softmax; Qwen2.5-VL's windowed layers
(keys outside a query's window stay at 0); towers with several images a row (an ``image`` axis), where a
knockout in one image leaves the others exactly as they were; and the errors."""

from __future__ import annotations

import sys

import pytest
import torch

import crosspatch as cp
from crosspatch.adapters.vlm import VLMAdapter, qwen2_vl
from crosspatch.adapters.vlm.tiny import tiny_model, tiny_vlm
from crosspatch.engine.forward import Bound
from crosspatch.engine.knockout import Knockout, KnockoutEdges, bind
from crosspatch.sites.site import SiteError

from conftest import randomize

from .tiny import tiny_llava, vlm_inputs

PATCHES = 16  # Qwen2-VL's tiny tower: 4 x 4 patches an image
CLIP_POS = 17  # LLaVA's tiny CLIP tower: the class token and 4 x 4 patches
TOWER = "vision.attn_pattern"


def random_masks(rows: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``src`` (about 40 % of the keys) and ``dst`` (about half the queries) masks ``[rows, n]``."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(rows, n, generator=g) < 0.4, torch.rand(rows, n, generator=g) < 0.5


@pytest.fixture(scope="module")
def qwen():
    return cp.wrap(randomize(tiny_model("qwen2_vl")).double(), VLMAdapter())


def qwen_inputs(model, images: int = 1, seed: int = 0) -> dict:
    raw = qwen2_vl.example_inputs(model, images=images, seed=seed)
    return {**raw, "pixel_values": raw["pixel_values"].double()}


@pytest.fixture(scope="module")
def llava():
    return cp.wrap(tiny_llava(num_hidden_layers=2).double(), VLMAdapter())


# (1) against a hand hook that sets the blocked scores to -inf before the softmax ---------------------------------


def _qwen_attention(src: torch.Tensor, dst: torch.Tensor, heads):
    """A forward hook on a Qwen2-VL vision attention recomputing it by hand from its input (fused qkv, 2-d rotary),
    per image (the chunks of ``cu_seqlens``, one image a row here) with the scores of keys ``src[r]`` for queries
    ``dst[r]`` of image ``r`` set to -inf in ``heads`` (None: all) before the softmax."""

    def hook(module, args, kwargs, output):
        x = args[0] if args else kwargs["hidden_states"]
        cu = kwargs["cu_seqlens"] if "cu_seqlens" in kwargs else args[1]
        rotary = sys.modules[type(module).__module__].apply_rotary_pos_emb_vision
        n, h = x.shape[0], module.num_heads
        q, k, v = module.qkv(x).reshape(n, 3, h, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = rotary(q, k, *kwargs["position_embeddings"])
        scores = torch.einsum("qhd,khd->hqk", q, k) * module.scaling
        image = torch.repeat_interleave(torch.arange(len(cu) - 1), cu[1:] - cu[:-1])
        masked = (image[:, None] != image[None, :]).expand(h, n, n).clone()
        chosen = range(h) if heads is None else heads
        for r in range(len(cu) - 1):
            block = slice(int(cu[r]), int(cu[r + 1]))
            for head in chosen:
                masked[head, block, block] |= dst[r][:, None] & src[r][None, :]
        pattern = torch.softmax(scores.masked_fill(masked, float("-inf")), dim=-1)
        return module.proj(torch.einsum("hqk,khd->qhd", pattern, v).reshape(n, -1))

    return hook


def _clip_attention(src: torch.Tensor, dst: torch.Tensor, heads):
    """A forward hook on a CLIP attention recomputing it by hand from its input, with the scores of keys ``src[r]``
    for queries ``dst[r]`` of row ``r`` set to -inf in ``heads`` (None: all) before the softmax."""

    def hook(module, args, kwargs, output):
        x = args[0] if args else kwargs["hidden_states"]
        rows, n, _ = x.shape
        q, k, v = (p(x).view(rows, n, module.num_heads, -1).transpose(1, 2)
                   for p in (module.q_proj, module.k_proj, module.v_proj))
        scores = q @ k.transpose(-1, -2) * module.scale  # [rows, head, query, key]
        blocked = (dst[:, :, None] & src[:, None, :]).unsqueeze(1).expand(rows, module.num_heads, n, n).clone()
        if heads is not None:
            blocked[:, [h for h in range(module.num_heads) if h not in heads]] = False
        pattern = torch.softmax(scores.masked_fill(blocked, float("-inf")), dim=-1)
        return module.out_proj((pattern @ v).transpose(1, 2).reshape(rows, n, -1)), output[1]

    return hook


def _hooked(module, hook, record, run):
    """``run()`` with ``hook`` on ``module``'s forward and the output of ``record`` kept; both removed after."""
    seen = []

    def keep(mod, args, out):
        seen.append(out[0] if isinstance(out, tuple) else out)

    handles = [module.register_forward_hook(hook, with_kwargs=True), record.register_forward_hook(keep)]
    try:
        with torch.no_grad():
            out = run()
    finally:
        for handle in handles:
            handle.remove()
    return out, seen[0]


@pytest.mark.parametrize("heads", [None, [1, 3]])
def test_qwen2_vl_tower_knockout_is_the_softmax_over_unblocked_scores(qwen, heads):
    """Knocking out src -> dst (per row) in block 0 of Qwen2-VL's tower equals the hand attention with the blocked
    scores at -inf: the last block's output and the logits, to 1e-10 in float64."""
    inp = qwen.prepare(qwen_inputs(qwen.module))
    src, dst = random_masks(2, PATCHES, seed=3)
    ko = Knockout(src, dst, layers=0, heads=heads, family=TOWER)
    run = qwen.run(inp, bind(qwen, inp, [ko]), capture=["vision.resid_post.1"])
    visual = qwen.module.model.visual
    logits, last = _hooked(visual.blocks[0].attn, _qwen_attention(src, dst, heads), visual.blocks[1],
                           lambda: qwen.module(**qwen2_vl.model_inputs(inp), use_cache=False).logits)
    torch.testing.assert_close(run.cache["vision.resid_post.1"], last.view(2, PATCHES, -1), rtol=0, atol=1e-10)
    torch.testing.assert_close(run.output, logits, rtol=0, atol=1e-10)
    plain = qwen.run(inp, capture=["vision.resid_post.1"]).cache["vision.resid_post.1"]
    moved = run.cache["vision.resid_post.1"] - plain
    assert moved.abs().max() > 1e-3  # the knockout moved the tower (the oracle's tolerance is 1e-10)


@pytest.mark.parametrize("heads", [None, [0, 2]])
def test_clip_tower_knockout_is_the_softmax_over_unblocked_scores(llava, heads):
    """The same on LLaVA's CLIP tower (block 0; its pos axis holds the class token and the patches)."""
    inp = llava.prepare(vlm_inputs())
    src, dst = random_masks(2, CLIP_POS, seed=4)
    ko = Knockout(src, dst, layers=0, heads=heads, family=TOWER)
    run = llava.run(inp, bind(llava, inp, [ko]), capture=["vision.resid_post.1"])
    layers = llava.module.model.vision_tower.encoder.layers
    logits, last = _hooked(layers[0].self_attn, _clip_attention(src, dst, heads), layers[1],
                           lambda: llava.module(**{k: inp[k] for k in ("input_ids", "attention_mask", "pixel_values")},
                                                use_cache=False).logits)
    torch.testing.assert_close(run.cache["vision.resid_post.1"], last, rtol=0, atol=1e-10)
    torch.testing.assert_close(run.output, logits, rtol=0, atol=1e-10)
    plain = llava.run(inp, capture=["vision.resid_post.1"]).cache["vision.resid_post.1"]
    moved = run.cache["vision.resid_post.1"] - plain
    assert moved.abs().max() > 1e-3


# (2) edges that carry no attention ----------------------------------------------------------------------------


def test_keys_outside_a_window_stay_at_zero():
    """Qwen2.5-VL with 4 windows of 16 patches: blocking every key outside window 0 for window 0's queries changes
    nothing bit for bit (against a plain run reading the patterns, the same attention function); blocking one key
    inside it moves the output, and the knocked pattern is still 0 outside each query's window."""
    model = randomize(tiny_vlm("qwen2_5_vl", vision={"window_size": 32})).double()
    m = cp.wrap(model, VLMAdapter())
    raw = qwen2_vl.example_inputs(model, grid=8)
    inp = m.prepare({**raw, "pixel_values": raw["pixel_values"].double()})
    plain = m.run(inp, capture=["vision.attn_pattern.*", "vision.resid_post.1"])
    pattern = plain.cache["vision.attn_pattern.0"]
    window = pattern[0, 0, 0] > 0  # the 16 patches of patch 0's window, the same in every row and head
    assert int(window.sum()) == 16 and torch.equal((pattern > 0).all(1), (pattern[:, 0] > 0))
    outside = Knockout(~window, window, layers=[0, 1], family=TOWER)
    run = m.run(inp, bind(m, inp, [outside]), capture=["vision.resid_post.1"])
    assert torch.equal(run.output, plain.output)
    assert torch.equal(run.cache["vision.resid_post.1"], plain.cache["vision.resid_post.1"])
    inside = window.clone()
    inside[0] = False  # patch 0 keeps itself
    one_key = torch.zeros(64, dtype=torch.bool)
    one_key[int(inside.nonzero()[0])] = True
    knocked = m.run(inp, bind(m, inp, [Knockout(one_key | ~window, window, layers=0, family=TOWER)]),
                    capture=["vision.attn_pattern.0"])
    assert not torch.equal(knocked.output, plain.output)
    new = knocked.cache["vision.attn_pattern.0"]
    assert torch.equal(new == 0, (pattern == 0) | (window[:, None] & one_key[None, :]))


# (3) several images a row -------------------------------------------------------------------------------------


def _two_images(kind: str, qwen, llava):
    """The model wrapped with two images a row and one, two-image inputs, and a function giving one-image inputs
    holding image ``i`` of each row."""
    if kind == "qwen2_vl":
        two, one = cp.wrap(qwen.module, VLMAdapter(images_per_row=2)), qwen
        inp = two.prepare(qwen_inputs(qwen.module, images=2, seed=5))

        def alone(i):
            pixels = inp["pixel_values"][:, PATCHES * i:PATCHES * (i + 1)]
            return one.prepare({**qwen_inputs(qwen.module), "pixel_values": pixels})

        return two, one, inp, alone, PATCHES
    two, one = cp.wrap(llava.module, VLMAdapter(images_per_row=2)), llava
    inp = two.prepare(two.adapter.example_inputs(two.module))
    return two, one, inp, lambda i: one.prepare({**vlm_inputs(), "pixel_values": inp["pixel_values"][:, i]}), CLIP_POS


@pytest.mark.parametrize("kind", ["qwen2_vl", "llava"])
def test_knockout_in_one_image_of_a_row(kind, qwen, llava):
    """With two images a row, a knockout whose dst holds image 1's queries alone ([1, image, n]) leaves image 0's tower
    sites bit for bit as in a plain run, and gives image 1's the knockout of image 1 run alone (1e-12)."""
    two, one, inp, alone, n = _two_images(kind, qwen, llava)
    src, dst = random_masks(1, n, seed=6)
    per_image = torch.zeros(1, 2, n, dtype=torch.bool)
    per_image[:, 1] = dst
    sites = ["vision.resid_post.0", "vision.resid_post.1"]
    plain = two.run(inp, capture=[*sites, "vision.attn_pattern.*"]).cache
    run = two.run(inp, bind(two, inp, [Knockout(src[0], per_image, layers=[0, 1], family=TOWER)]), capture=sites).cache
    single = alone(1)
    solo = one.run(single, bind(one, single, [Knockout(src, dst, layers=[0, 1], family=TOWER)]), capture=sites).cache
    for site in sites:
        assert torch.equal(run[site][:, 0], plain[site][:, 0])
        torch.testing.assert_close(run[site][:, 1], solo[site], rtol=0, atol=1e-12)
        assert (run[site][:, 1] - plain[site][:, 1]).abs().max() > 1e-4
    shared = two.run(inp, bind(two, inp, [Knockout(src, dst, layers=0, family=TOWER)]), capture=sites).cache
    for i in range(2):  # a [rows, n] mask applies to every image alike
        single = alone(i)
        want = one.run(single, bind(one, single, [Knockout(src, dst, layers=0, family=TOWER)]), capture=sites).cache
        torch.testing.assert_close(shared["vision.resid_post.1"][:, i], want["vision.resid_post.1"], rtol=0, atol=1e-12)


def test_knockout_in_one_crop_of_llava_next():
    """LLaVA-NeXT with VLMAdapter(images_per_row=1 + crops): a knockout in crop 1 (image 2) alone leaves the whole
    image's and crop 0's tower sites bit for bit as in a plain run, and moves crop 1's."""
    from .test_llava_next import inputs as next_inputs

    model = randomize(tiny_model("llava_next")).double()
    base = cp.wrap(model, VLMAdapter())
    raw = next_inputs(base)
    k = raw["pixel_values"].shape[1]
    m = cp.wrap(model, VLMAdapter(images_per_row=k))
    inp = m.prepare(raw)
    src, dst = random_masks(1, CLIP_POS, seed=7)
    in_crop_1 = torch.zeros(1, k, CLIP_POS, dtype=torch.bool)
    in_crop_1[:, 2] = dst
    plain = m.run(inp, capture=["vision.resid_post.1", "vision.attn_pattern.*"]).cache["vision.resid_post.1"]
    run = m.run(inp, bind(m, inp, [Knockout(src, in_crop_1, layers=0, family=TOWER)]),
                capture=["vision.resid_post.1"]).cache["vision.resid_post.1"]
    assert run.shape[1] == k == 3
    assert torch.equal(run[:, :2], plain[:, :2])
    assert (run[:, 2] - plain[:, 2]).abs().max() > 1e-3


# (4) errors ---------------------------------------------------------------------------------------------------


def test_group_names_are_refused_in_a_tower(qwen, llava):
    """The tower's patches carry no groups: the error says so and names the masks accepted."""
    inp = qwen.prepare(qwen_inputs(qwen.module))
    with pytest.raises(SiteError, match=r"src names the position group 'image', but the 'patch' positions of "
                                        r"'vision.attn_pattern' \(head, patch, key_patch\) are not the inputs' token "
                                        r"positions \(a tower's patches\), and carry no groups; give a boolean mask "
                                        r"\[patch\] / \[rows, patch\]$"):
        bind(qwen, inp, [Knockout("image", torch.ones(PATCHES, dtype=torch.bool), family=TOWER)])
    linp = llava.prepare(vlm_inputs())
    with pytest.raises(SiteError, match=r"dst names the position group 'question'.*\[17\] / \[rows, 17\]"):
        bind(llava, linp, [Knockout(torch.ones(CLIP_POS, dtype=torch.bool), "question", family=TOWER)])
    two = cp.wrap(qwen.module, VLMAdapter(images_per_row=2))
    inp2 = two.prepare(qwen_inputs(qwen.module, images=2))
    with pytest.raises(SiteError, match=r"carry no groups; give a boolean mask \[patch\] / \[rows, patch\] / "
                                        r"\[rows, image, patch\]$"):
        bind(two, inp2, [Knockout("image0", "image0", family=TOWER)])


def test_mask_errors_name_the_sizes(qwen):
    inp = qwen.prepare(qwen_inputs(qwen.module))
    some = torch.zeros(PATCHES, dtype=torch.bool)
    some[3] = True
    with pytest.raises(SiteError, match=r"src mask covers 17 positions, but the pattern's axis 'key_patch' has 16"):
        qwen.run(inp, bind(qwen, inp, [Knockout(torch.ones(17, dtype=torch.bool), some, layers=0, family=TOWER)]))
    with pytest.raises(SiteError, match=r"dst has shape \(1, 2, 16\); give a boolean mask \[patch\] / "
                                        r"\[rows, patch\]$"):
        bind(qwen, inp, [Knockout(some, torch.zeros(1, 2, PATCHES, dtype=torch.bool), family=TOWER)])
    with pytest.raises(SiteError, match="has 3 rows, the batch 2"):
        three_rows = torch.zeros(3, PATCHES, dtype=torch.bool)
        qwen.run(inp, bind(qwen, inp, [Knockout(some, three_rows, layers=0, family=TOWER)]))
    with pytest.raises(SiteError, match=r"selected by head at most.*\['patch'\] selected"):
        qwen.run(inp, [Bound(cp.Site.parse("vision.attn_pattern.0[patch=3]"), KnockoutEdges(some, some))])
    with pytest.raises(SiteError, match=r"has axes \(patch, head, d_head\); a knockout writes an attention pattern"):
        bind(qwen, inp, [Knockout(some, some, family="vision.head_z")])


def test_image_axis_errors(qwen):
    two = cp.wrap(qwen.module, VLMAdapter(images_per_row=2))
    inp = two.prepare(qwen_inputs(qwen.module, images=2))
    everything = torch.ones(PATCHES, dtype=torch.bool)
    in_image_1 = torch.zeros(1, 2, PATCHES, dtype=torch.bool)
    in_image_1[0, 1, 5] = True
    with pytest.raises(SiteError, match=r"query patch 5 of row 0, image 1 \(head 0 of the selection\) has all its "
                                        r"attention blocked"):
        two.run(inp, bind(two, inp, [Knockout(everything, in_image_1, layers=1, family=TOWER)]))
    with pytest.raises(SiteError, match=r"dst mask covers 3 images, the pattern 2 a row; give \[16\] or \[rows, 16\], "
                                        r"or \[rows, 2, 16\] per image"):
        two.run(inp, bind(two, inp, [Knockout(everything, torch.zeros(1, 3, PATCHES, dtype=torch.bool), layers=0,
                                              family=TOWER)]))
