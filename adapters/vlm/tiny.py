"""Tiny random vision-language models built from configs (no downloads): ``crosspatch verify --config llava``
and the tests use them. Each has two vision blocks (16 patches of a 16 x 16 image), a projector, and a
two-block language model with grouped-query attention (4 query heads on 2 key/value heads). :func:`tiny_vlm`
builds any image-text-to-text model type of transformers from its shrunk default config (the coverage table's)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["IMAGE_TOKEN", "KINDS", "tiny_model", "tiny_vlm", "vlm_types"]

IMAGE_TOKEN = 63  # the last id of the 64-token vocabulary
KINDS = ("llava", "paligemma", "idefics3", "qwen2_vl", "llava_next")

_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=16, patch_size=4)
_TEXT = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def tiny_model(kind: str, seed: int = 0, vision: dict | None = None, text: dict | None = None, **config) -> nn.Module:
    """A tiny ``kind`` model (:data:`KINDS`) in eval mode with seeded random weights; ``vision`` / ``text``
    override sub-config fields, ``config`` the top-level ones (``vision_feature_layer=-2``)."""
    import transformers as T

    torch.manual_seed(seed)
    v, t = {**_VISION, **(vision or {})}, {**_TEXT, **(text or {})}
    if kind == "llava":
        cfg = T.LlavaConfig(vision_config=T.CLIPVisionConfig(**v, projection_dim=32), text_config=T.LlamaConfig(**t),
                            image_token_index=IMAGE_TOKEN, **{"vision_feature_layer": -1,
                                                              "vision_feature_select_strategy": "default", **config})
        return T.LlavaForConditionalGeneration(cfg).eval()
    if kind == "paligemma":
        cfg = T.PaliGemmaConfig(vision_config=T.SiglipVisionConfig(**v), text_config=T.GemmaConfig(**t, head_dim=8),
                                image_token_index=IMAGE_TOKEN, projection_dim=32, **config)
        return T.PaliGemmaForConditionalGeneration(cfg).eval()
    if kind == "idefics3":
        cfg = T.Idefics3Config(vision_config=v, text_config={"model_type": "llama", **t}, image_token_id=IMAGE_TOKEN,
                               **{"scale_factor": 2, **config})
        return T.Idefics3ForConditionalGeneration(cfg).eval()
    if kind == "qwen2_vl":  # 4 x 4 patches of 4 pixels per image, merged 2 x 2 into 4 image tokens
        vision_config = dict(depth=2, embed_dim=32, hidden_size=32, num_heads=4, mlp_ratio=2, patch_size=4,
                             spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
        cfg = T.Qwen2VLConfig(vision_config={**vision_config, **(vision or {})},
                              text_config={**t, "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]}},
                              image_token_id=IMAGE_TOKEN, vision_start_token_id=61, vision_end_token_id=62, **config)
        return T.Qwen2VLForConditionalGeneration(cfg).eval()
    if kind == "llava_next":  # anyres grids of 16-pixel crops: 1 x 2, 2 x 1, 2 x 2
        cfg = T.LlavaNextConfig(vision_config=T.CLIPVisionConfig(**v, projection_dim=32), text_config=T.LlamaConfig(**t),
                                image_token_index=IMAGE_TOKEN, image_grid_pinpoints=[[16, 32], [32, 16], [32, 32]],
                                **{"vision_feature_layer": -1, "vision_feature_select_strategy": "default", **config})
        return T.LlavaNextForConditionalGeneration(cfg).eval()
    raise ValueError(f"no tiny vision-language model {kind!r}; kinds: {', '.join(KINDS)}")


#: Special-token ids of a vision-language config that index its text vocabulary (the image token and its kin).
_SPECIAL = ("image_token_id", "image_token_index", "video_token_id", "video_token_index", "vision_start_token_id",
            "vision_end_token_id", "boi_token_id", "eoi_token_id", "boi_token_index", "eoi_token_index",
            "image_start_token_id", "image_end_token_id", "vision_token_id", "fake_image_token_id", "global_image_token_id")


def vlm_types() -> list[str]:
    """Every model type of transformers' image-text-to-text auto mapping, sorted."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return sorted(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)


def tiny_vlm(model_type: str, seed: int = 0, vision: dict | None = None) -> nn.Module:
    """A tiny random model of any image-text-to-text ``model_type``: the config class's defaults shrunk as for
    language models (:func:`crosspatch.adapters.transformers.tiny.tiny_config`, which shrinks the text and
    vision sub-configs too), with the special-token ids moved inside the shrunk text vocabulary; ``vision``
    overrides fields of the vision config (Qwen2.5-VL's ``window_size``). Weight matrices the model
    initialises to 0 get small random values, so that every site can reach the output."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    from crosspatch.adapters.transformers.tiny import tiny_config

    names = MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.get(model_type)
    if names is None:
        raise ValueError(f"transformers has no image-text-to-text model for {model_type!r}; types: {', '.join(vlm_types())}")
    cls = getattr(transformers, names if isinstance(names, str) else names[0])
    config = tiny_config(model_type)
    text = getattr(config, "text_config", None)
    vocab = getattr(text, "vocab_size", None) or getattr(config, "vocab_size", None)
    if isinstance(vocab, int):
        taken = {getattr(text, k, None) for k in ("pad_token_id", "bos_token_id", "eos_token_id")}
        free = (i for i in range(vocab - 1, 2, -1) if i not in taken)
        for key in _SPECIAL:
            value = getattr(config, key, None)
            if isinstance(value, int) and not isinstance(value, bool) and value >= vocab:
                setattr(config, key, next(free))
    if text is not None:
        _fit_to_text(config, text)
    for key, value in (vision or {}).items():
        setattr(config.vision_config, key, value)
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():  # weight matrices initialised to 0 (Gemma 3's projection) would cut the image off the text
        for p in model.parameters():
            if p.ndim >= 2 and not bool(p.any()):
                p.normal_(0.0, 0.02)
    return model


def _fit_to_text(config, text) -> None:
    """Widths the shrink left at their defaults though they must match the shrunk parts: the projection into
    the text width (PaliGemma's ``projection_dim``, Qwen2.5-VL's ``out_hidden_size``), multimodal rotary
    sections summing to half the text head width (Qwen2-VL), image tokens the vision grid can hold (Gemma 3),
    concatenated hidden states the shrunk tower has (VipLLaVA), anyres grids of the shrunk image size (LLaVA-NeXT)."""
    width = getattr(text, "hidden_size", None)
    vision = getattr(config, "vision_config", None)
    for owner, key in ((config, "projection_dim"), (vision, "projection_dim"), (vision, "out_hidden_size")):
        if owner is not None and isinstance(getattr(owner, key, None), int) and isinstance(width, int):
            setattr(owner, key, width)
    rope = getattr(text, "rope_parameters", None)
    if isinstance(rope, dict) and "mrope_section" in getattr(text, "ignore_keys_at_rope_validation", ()):
        heads = getattr(text, "num_attention_heads", None)
        head = getattr(text, "head_dim", None) or (width // heads if width and heads else None)
        sections = rope.get("mrope_section") or [16, 24, 24]
        if head:
            half, total = head // 2, sum(sections)
            scaled = [max(1, s * half // total) for s in sections]
            scaled[-1] += half - sum(scaled)
            rope["mrope_section"] = scaled
    pinpoints, side = getattr(config, "image_grid_pinpoints", None), getattr(vision, "image_size", None)
    if isinstance(pinpoints, list) and isinstance(side, int):  # LLaVA-NeXT: grids of 1 x 2, 2 x 1 and 2 x 2 crops
        config.image_grid_pinpoints = [[side, 2 * side], [2 * side, side], [2 * side, 2 * side]]
    layers, depth = getattr(config, "vision_feature_layers", None), getattr(vision, "num_hidden_layers", None)
    if isinstance(layers, (list, tuple)) and isinstance(depth, int):  # VipLLaVA concatenates hidden states
        kept = [layer for layer in layers if -depth - 1 <= layer <= depth][:2]
        config.vision_feature_layers = kept if len(kept) == 2 else [-2, -1]
    size, patch = getattr(vision, "image_size", None), getattr(vision, "patch_size", None)
    tokens = getattr(config, "mm_tokens_per_image", None)
    if isinstance(size, int) and isinstance(patch, int) and isinstance(tokens, int):
        patches = (size // patch) ** 2
        if tokens > patches:
            config.mm_tokens_per_image = patches // 4
