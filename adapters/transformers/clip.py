"""HuggingFace ``CLIPModel`` under the two-tower site names of the open_clip adapter.

The transformers adapter hands ``model_type == "clip"`` models to this module, so a study written
for open_clip models (``vision.head_out.*``, ``text.resid_pre.*``, ``logits``...) runs unchanged on
a HuggingFace CLIP. Inputs, rows and candidates, and outputs are those of
:mod:`crosspatch.adapters.transformers.twotower` (``pixel_values`` / ``input_ids`` are accepted as
aliases of ``images`` / ``texts``).

Where the two libraries agree (pre-LN blocks, class-token pooling, causal text tower pooled at the
end token) the sites hold the same values: ``vision.embed`` is the output of ``pre_layrnorm`` (what
open_clip's ``ln_pre`` gives), ``text.embed`` the token + position embeddings. HuggingFace CLIP
attention is not fused, so heads and patterns are reached directly (patterns through the eager
attention function of the transformers adapter, switched on for the runs that read them).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from crosspatch.engine.adapter import Inputs, model_device
from crosspatch.sites.catalog import Axis, Catalog, LinearFrom, SiteFamily
from crosspatch.engine.reach import ModuleInput, ModuleOutput, submodule

from . import twotower
from .twotower import HEAD_IN_DOC, HEAD_Z_DOC, LOGITS_IN_DOC, MLP_IN_DOC, TwoTowerOutput

from .inputs import HeadIn, InputLayout
from .reaches import AttentionPattern, HeadOut, HeadZ, ResidualAfterAttention

__all__ = ["is_clip", "catalog", "prepare", "forward", "sizes", "describe", "readout", "TwoTowerOutput"]

_TOWERS = {"vision": "vision_model", "text": "text_model"}

# CLIPEncoderLayer: layer_norm1, then self_attn.{q,k,v}_proj; layer_norm2, then mlp. The towers' final
# norms are not in it: logits_in is the last layer's output (see _tower_families).
_INPUTS = InputLayout("layer_norm1", "layer_norm2", None, ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"))


def is_clip(model: nn.Module) -> bool:
    """A two-tower CLIP model: model type ``clip`` with both towers (``CLIPForImageClassification`` has the
    vision tower alone and is served as a vision encoder, by inference)."""
    return getattr(getattr(model, "config", None), "model_type", None) == "clip" and all(
        isinstance(getattr(model, tower, None), nn.Module) for tower in _TOWERS.values()
    )


def _tower_families(model: nn.Module, name: str) -> list[SiteFamily]:
    tower = getattr(model, _TOWERS[name])
    config = tower.config
    root = _TOWERS[name]
    block = f"{root}.encoder.layers.{{layer}}"
    n = len(tower.encoder.layers)
    heads = config.num_attention_heads
    if name == "vision":
        n_pos: int | None = tower.embeddings.num_positions
        embed = ModuleOutput(model, f"{root}.pre_layrnorm")
        embed_doc = "class token + patch embeddings entering the first block (after pre_layrnorm)"
    else:
        n_pos = None  # the input decides
        embed = ModuleOutput(model, f"{root}.embeddings")
        embed_doc = "token + position embeddings entering the first block"
    pos, dim = Axis("pos", n_pos), Axis("dim", config.hidden_size)
    attn_config = submodule(model, f"{block}.self_attn", 0).config
    p = f"{name}."
    head_out = HeadOut(model, f"{block}.self_attn.out_proj", heads, False)
    return [
        SiteFamily(p + "embed", (pos, dim), embed, doc=embed_doc),
        SiteFamily(p + "resid_pre", (pos, dim), ModuleInput(model, block), n, "residual stream entering the block"),
        SiteFamily(p + "head_in", (pos, Axis("qkv", 3), Axis("head", heads), dim),
                   HeadIn(model, block, _INPUTS, heads, False), n, HEAD_IN_DOC),
        SiteFamily(
            p + "attn_pattern", (Axis("head", heads), pos, Axis("key_pos", n_pos)),
            AttentionPattern(model, f"{block}.self_attn", attn_config), n,
            "attention probabilities (query pos, key pos)",
        ),
        SiteFamily(
            p + "head_z", (pos, Axis("head", heads), Axis("d_head", config.hidden_size // heads)),
            HeadZ(model, f"{block}.self_attn.out_proj", heads), n, HEAD_Z_DOC,
        ),
        SiteFamily(
            p + "head_out", (pos, Axis("head", heads), dim), head_out,
            n, "each head's write into the residual (heads + out_proj bias = attn_out)",
            linear_from=LinearFrom(p + "head_z", ("pos", "head"), head_out.writes),
        ),
        SiteFamily(p + "attn_out", (pos, dim), ModuleOutput(model, f"{block}.self_attn"), n, "attention write"),
        SiteFamily(p + "resid_mid", (pos, dim), ResidualAfterAttention(model, block, f"{block}.self_attn"), n,
                   "residual after attention"),
        SiteFamily(p + "mlp_in", (pos, dim), ModuleInput(model, f"{block}.layer_norm2", name=None), n, MLP_IN_DOC),
        SiteFamily(p + "mlp_act", (pos, Axis("neuron", config.intermediate_size)),
                   ModuleInput(model, f"{block}.mlp.fc2", name=None), n, "MLP neuron activations"),
        SiteFamily(p + "mlp_out", (pos, dim), ModuleOutput(model, f"{block}.mlp"), n, "MLP write"),
        SiteFamily(p + "resid_post", (pos, dim), ModuleOutput(model, block), n, "residual stream leaving the block"),
        # The text tower's final_layer_norm reads exactly this; the vision tower's post_layernorm reads its
        # position 0 (pooled first), so the last layer's output is the per-position point both share.
        SiteFamily(p + "logits_in", (pos, dim), ModuleOutput(model, block.format(layer=n - 1)), doc=LOGITS_IN_DOC[name]),
    ]


def catalog(model: nn.Module) -> Catalog:
    families = _tower_families(model, "vision") + _tower_families(model, "text")
    taps = twotower.taps_for(model)
    dim = Axis("dim", model.config.projection_dim)
    families += [
        SiteFamily("image_embed", (dim,), taps["image_embed"], doc="image embedding (projected, before normalisation)"),
        SiteFamily("text_embed", (dim,), taps["text_embed"], doc="text embedding (projected, before normalisation)"),
        SiteFamily("logits", (Axis("candidate"),), taps["logits"],
                   doc="logit_scale * cosine(row, candidate): image-text similarity"),
    ]
    return Catalog(families, type(model).__name__)


def prepare(model: nn.Module, inputs: Any) -> Inputs:
    dtype = model.vision_model.embeddings.patch_embedding.weight.dtype
    prepared = twotower.prepare_inputs(inputs, model_device(model), dtype)
    _, texts, _ = twotower.split_inputs(prepared)
    limit = model.text_model.embeddings.position_embedding.weight.shape[0]
    if texts is not None and texts.shape[1] > limit:
        raise ValueError(f"texts have {texts.shape[1]} tokens; this model takes at most {limit}")
    return prepared


def forward(model: nn.Module, inputs: Inputs) -> TwoTowerOutput:
    def encode_image(images: torch.Tensor) -> torch.Tensor:
        return model.visual_projection(model.vision_model(pixel_values=images).pooler_output)

    def encode_text(texts: torch.Tensor) -> torch.Tensor:
        return model.text_projection(model.text_model(input_ids=texts).pooler_output)

    return twotower.run_towers(model, inputs, encode_image, encode_text, model.logit_scale,
                               getattr(model, "logit_bias", None))


def sizes(inputs: Inputs) -> dict[str, int]:
    return twotower.sizes(inputs)


def describe(model: nn.Module) -> dict[str, Any]:
    config = model.config
    out: dict[str, Any] = {"class": type(model).__name__, "library": "transformers", "model_type": config.model_type}
    for name, attr in _TOWERS.items():
        c = getattr(config, f"{name}_config")
        out[name] = {"n_layers": c.num_hidden_layers, "n_heads": c.num_attention_heads, "d_model": c.hidden_size}
    out["vision"]["image_size"] = config.vision_config.image_size
    out["vision"]["patch_size"] = config.vision_config.patch_size
    out["text"]["context_length"] = config.text_config.max_position_embeddings
    out["embed_dim"] = config.projection_dim
    out["name_or_path"] = getattr(config, "name_or_path", "") or ""
    out["dtype"] = str(model.visual_projection.weight.dtype).removeprefix("torch.")
    return out


def readout(model: nn.Module, tower: str = "vision"):
    """The vision readout: class token, ``post_layernorm``, ``visual_projection``."""
    from crosspatch.methods.cross_modal import LinearReadout

    if tower != "vision":
        raise NotImplementedError("the CLIP readout is described for the vision tower only")
    norm = model.vision_model.post_layernorm
    proj = model.visual_projection
    return LinearReadout(
        residual=f"vision.resid_post.{len(model.vision_model.encoder.layers) - 1}",
        pool="first",
        norm_weight=norm.weight,
        norm_bias=norm.bias,
        eps=float(norm.eps),
        normalize=True,
        proj=proj.weight.detach().T,
        proj_bias=proj.bias,
    )
