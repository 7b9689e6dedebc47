"""Qwen2-VL's vision tower and merger as site families, one image per row.

The tower (``model.model.visual``) runs every image's patches as one flat sequence ``[patches of all
images, d]``; attention stays within each image (the chunks of ``cu_seqlens``), with 2-d rotary positions
and no window. With one image per row and every image of one grid (what the vlm adapter takes), the flat
sequence is ``[rows * patches, d]`` in row order, so each site shows it as ``[rows, patch, ...]``
(:class:`~crosspatch.adapters.vlm.reaches.PerImage`). The ``patch`` axis is the tower's own order: the
processor lays patches out block by block over ``spatial_merge_size`` x ``spatial_merge_size`` windows,
so the 4 patches the merger folds into one image token are consecutive.

Families (``vision.`` prefix as for CLIP towers): ``embed`` (what enters block 0),
``resid_pre``, ``attn_pattern`` (``[head, patch, key_patch]``), ``head_z``, ``head_out`` (heads + the
``proj`` bias = ``attn_out``), ``attn_out``, ``resid_mid``, ``mlp_in``, ``mlp_act``, ``mlp_out``,
``resid_post``; and ``projector_out``, the merger's output ``[rows, image_pos, d_text]``, one per image token.
Sizes of ``patch`` and ``image_pos`` come from the inputs' ``image_grid_thw``.
"""

from __future__ import annotations

import torch
from torch import nn

from crosspatch.engine.reach import ModuleInput, ModuleOutput
from crosspatch.sites.catalog import Axis, LinearFrom, SiteFamily

from crosspatch.adapters.transformers.reaches import HeadZ, ResidualAfterAttention
from crosspatch.adapters.transformers.twotower import HEAD_Z_DOC, MLP_IN_DOC

from .reaches import FlatAttentionPattern, FlatHeadOut, OutputField, PerImage

__all__ = ["vision_families", "vision_sizes", "NOT_SERVED"]

_MLP_OUT = ("fc2", "down_proj", "linear_fc2")  # the MLP's last linear (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): it reads the neurons

NOT_SERVED = {
    "vision.head_in": "the tower's queries, keys and values come from one fused qkv projection of the normed residual; "
    "per-head inputs are not split out",
}


def vision_families(model: nn.Module) -> tuple[list[SiteFamily], dict[str, str]]:
    """The tower's and the merger's families, and those not served with the reason."""
    visual = model.model.visual
    config = visual.config
    heads, d = config.num_heads, getattr(config, "embed_dim", None) or config.hidden_size
    n = len(visual.blocks)
    mlp_last = next(name for name in _MLP_OUT if hasattr(visual.blocks[0].mlp, name))
    block = "blocks.{layer}"
    patch, key_patch, dim = Axis("patch"), Axis("key_patch"), Axis("dim", d)

    def flat(inner) -> PerImage:
        return PerImage(visual, inner)

    head_out = FlatHeadOut(visual, visual, f"{block}.attn.proj", heads)
    p = "vision."
    families = [
        SiteFamily(p + "embed", (patch, dim), flat(ModuleInput(visual, block.format(layer=0))),
                   doc="what enters the first block: the patch embeddings (plus Qwen3-VL's learned position embeddings; "
                   "rotary positions are applied inside attention)"),
        SiteFamily(p + "resid_pre", (patch, dim), flat(ModuleInput(visual, block)), n, "residual stream entering the block"),
        SiteFamily(p + "attn_pattern", (Axis("head", heads), patch, key_patch), FlatAttentionPattern(visual, f"{block}.attn"), n,
                   "attention probabilities within each image (query patch, key patch)"),
        SiteFamily(p + "head_z", (patch, Axis("head", heads), Axis("d_head", d // heads)),
                   flat(HeadZ(visual, f"{block}.attn.proj", heads)), n, HEAD_Z_DOC),
        SiteFamily(p + "head_out", (patch, Axis("head", heads), dim), head_out, n,
                   "each head's write into the residual (heads + proj bias = attn_out)",
                   linear_from=LinearFrom(p + "head_z", ("patch", "head"), head_out.writes)),
        SiteFamily(p + "attn_out", (patch, dim), flat(ModuleOutput(visual, f"{block}.attn")), n, "attention write"),
        SiteFamily(p + "resid_mid", (patch, dim), flat(ResidualAfterAttention(visual, block, f"{block}.attn")), n,
                   "residual after attention"),
        SiteFamily(p + "mlp_in", (patch, dim), flat(ModuleInput(visual, f"{block}.norm2", name=None)), n, MLP_IN_DOC),
        SiteFamily(p + "mlp_act", (patch, Axis("neuron", getattr(visual.blocks[0].mlp, mlp_last).in_features)),
                   flat(ModuleInput(visual, f"{block}.mlp.{mlp_last}", name=None)), n, "MLP neuron activations"),
        SiteFamily(p + "mlp_out", (patch, dim), flat(ModuleOutput(visual, f"{block}.mlp")), n, "MLP write"),
        SiteFamily(p + "resid_post", (patch, dim), flat(ModuleOutput(visual, block)), n, "residual stream leaving the block"),
        SiteFamily("projector_out", (Axis("image_pos"), Axis("dim", model.config.text_config.hidden_size)),
                   flat(OutputField(visual, "pooler_output")),
                   doc="the merger's output, one per image token (spatial_merge_size ** 2 patches each), before it "
                   "replaces the image-token embeddings"),
    ]
    unavailable = dict(NOT_SERVED)
    parts = sorted(name for name, _ in visual.blocks[0].attn.named_children())
    if parts != ["proj", "qkv"]:  # the pattern's eager forward recomputes qkv, rotary, softmax and proj only
        families = [f for f in families if f.name != p + "attn_pattern"]
        unavailable[p + "attn_pattern"] = (f"the tower's attention has parts ({', '.join(parts)}) beyond qkv and proj, "
                                           f"which the pattern's eager recomputation does not know")
    return families, unavailable


def vision_sizes(inputs, k: int = 1) -> dict[str, int]:
    """``patch`` / ``key_patch`` (patches per image) and ``image_pos`` (image tokens per image) of prepared
    inputs with ``k`` images a row."""
    grid = inputs.get("image_grid_thw")
    if grid is None:
        return {}
    patches = int(grid.reshape(-1, 3)[0].prod())
    return {"patch": patches, "key_patch": patches, "image_pos": int(inputs["group.image"][0].sum()) // k}
