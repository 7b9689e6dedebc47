"""Copy an open_clip CLIP into a HuggingFace ``CLIPModel`` with the same function.

    hf = to_transformers(model)     # transformers.CLIPModel, same weights, same outputs

Useful to check that a study gives the same answer through both adapters, or to hand a model
trained with open_clip (the ``shapes-clip`` zoo model) to HuggingFace tooling. Supported: a
vision transformer with ``ln_pre``, class-token pooling and a projection; open_clip's own causal text
transformer pooled at the highest token id (open_clip's ``argmax`` pooling, the end token of its
tokenizer); no LayerScale, no custom attention features; GELU or QuickGELU.
"""

from __future__ import annotations

from torch import nn

from .attention import UnfusedAttention

__all__ = ["to_transformers"]


def _check(model: nn.Module) -> None:
    visual = model.visual
    problems = []
    if getattr(visual, "attn_pool", None) is not None or visual.pool_type != "tok":
        problems.append("the image is not pooled from the class token")
    if isinstance(visual.ln_pre, nn.Identity):
        problems.append("the vision tower has no ln_pre")
    if hasattr(model, "text"):
        problems.append("CustomTextCLIP text towers are not converted")
    if getattr(model, "text_pool_type", "argmax") != "argmax":
        problems.append(f"text pooling {model.text_pool_type!r} (only 'argmax')")
    if getattr(model, "logit_bias", None) is not None:
        problems.append("a logit bias (SigLIP)")
    for name, module in model.named_modules():
        if name.endswith(("ls_1", "ls_2")) and not isinstance(module, nn.Identity):
            problems.append("LayerScale")
            break
        attn = getattr(module, "attn", None)
        if name.split(".")[-2:-1] == ["resblocks"] and not isinstance(attn, (nn.MultiheadAttention, UnfusedAttention)):
            problems.append(f"attention of type {type(attn).__name__}")
            break
    if problems:
        raise ValueError("cannot convert this open_clip model to transformers.CLIPModel: " + "; ".join(problems))


def _activation(model: nn.Module) -> str:
    act = model.visual.transformer.resblocks[0].mlp.gelu
    if type(act).__name__ == "QuickGELU":
        return "quick_gelu"
    if isinstance(act, nn.GELU) and act.approximate == "none":
        return "gelu"
    if isinstance(act, nn.GELU) and act.approximate == "tanh":
        return "gelu_new"
    raise ValueError(f"no transformers activation matches {act!r}")


def to_transformers(model: nn.Module):
    """A ``transformers.CLIPModel`` holding a copy of ``model``'s weights (same device and dtype)."""
    from transformers import CLIPConfig, CLIPModel

    _check(model)
    visual = model.visual
    v_block = visual.transformer.resblocks[0]
    t_block = model.transformer.resblocks[0]
    act = _activation(model)
    eps = float(visual.ln_post.eps)
    vision_config = dict(
        hidden_size=visual.transformer.width,
        intermediate_size=v_block.mlp.c_fc.out_features,
        num_hidden_layers=len(visual.transformer.resblocks),
        num_attention_heads=v_block.attn.num_heads,
        image_size=visual.image_size[0],
        patch_size=visual.patch_size[0],
        num_channels=visual.conv1.in_channels,
        hidden_act=act,
        layer_norm_eps=eps,
    )
    text_config = dict(
        vocab_size=model.vocab_size,
        hidden_size=model.transformer.width,
        intermediate_size=t_block.mlp.c_fc.out_features,
        num_hidden_layers=len(model.transformer.resblocks),
        num_attention_heads=t_block.attn.num_heads,
        max_position_embeddings=model.context_length,
        hidden_act=act,
        layer_norm_eps=float(model.ln_final.eps),
        # eos_token_id 2 selects HuggingFace's legacy pooling, at the highest token id: open_clip's argmax
        eos_token_id=2, bos_token_id=0, pad_token_id=0,
    )
    embed_dim = visual.proj.shape[1]
    config = CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=embed_dim,
                        logit_scale_init_value=float(model.logit_scale.detach()))
    hf = CLIPModel(config)
    param = next(model.parameters())
    hf = hf.to(device=param.device, dtype=param.dtype).eval()

    state = {}
    v, t = "vision_model.", "text_model."
    state[v + "embeddings.class_embedding"] = visual.class_embedding
    state[v + "embeddings.patch_embedding.weight"] = visual.conv1.weight
    state[v + "embeddings.position_embedding.weight"] = visual.positional_embedding
    state[v + "pre_layrnorm.weight"], state[v + "pre_layrnorm.bias"] = visual.ln_pre.weight, visual.ln_pre.bias
    state[v + "post_layernorm.weight"], state[v + "post_layernorm.bias"] = visual.ln_post.weight, visual.ln_post.bias
    state["visual_projection.weight"] = visual.proj.T
    state[t + "embeddings.token_embedding.weight"] = model.token_embedding.weight
    state[t + "embeddings.position_embedding.weight"] = model.positional_embedding
    state[t + "final_layer_norm.weight"], state[t + "final_layer_norm.bias"] = model.ln_final.weight, model.ln_final.bias
    state["text_projection.weight"] = model.text_projection.T
    state["logit_scale"] = model.logit_scale.reshape(())
    for prefix, blocks in ((v, visual.transformer.resblocks), (t, model.transformer.resblocks)):
        for i, block in enumerate(blocks):
            p = f"{prefix}encoder.layers.{i}."
            wq, wk, wv = block.attn.in_proj_weight.chunk(3)
            bq, bk, bv = block.attn.in_proj_bias.chunk(3)
            for name, w, b in (("q_proj", wq, bq), ("k_proj", wk, bk), ("v_proj", wv, bv)):
                state[p + f"self_attn.{name}.weight"], state[p + f"self_attn.{name}.bias"] = w, b
            state[p + "self_attn.out_proj.weight"] = block.attn.out_proj.weight
            state[p + "self_attn.out_proj.bias"] = block.attn.out_proj.bias
            state[p + "layer_norm1.weight"], state[p + "layer_norm1.bias"] = block.ln_1.weight, block.ln_1.bias
            state[p + "layer_norm2.weight"], state[p + "layer_norm2.bias"] = block.ln_2.weight, block.ln_2.bias
            state[p + "mlp.fc1.weight"], state[p + "mlp.fc1.bias"] = block.mlp.c_fc.weight, block.mlp.c_fc.bias
            state[p + "mlp.fc2.weight"], state[p + "mlp.fc2.bias"] = block.mlp.c_proj.weight, block.mlp.c_proj.bias
    state = {k: v.detach().clone().contiguous() for k, v in state.items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:  # pragma: no cover - a transformers release renamed something
        raise RuntimeError(f"weight copy to CLIPModel failed: missing {missing}, unexpected {unexpected}")
    return hf
