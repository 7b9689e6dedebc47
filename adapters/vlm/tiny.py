"""Tiny random vision-language models built from configs (no downloads): ``crosspatch verify --config llava``
and the tests use them. Each has two vision blocks (16 patches of a 16 x 16 image), a projector, and a
two-block language model with grouped-query attention (4 query heads on 2 key/value heads)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["IMAGE_TOKEN", "KINDS", "tiny_model"]

IMAGE_TOKEN = 63  # the last id of the 64-token vocabulary
KINDS = ("llava", "paligemma", "idefics3", "qwen2_vl")

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
    raise ValueError(f"no tiny vision-language model {kind!r}; kinds: {', '.join(KINDS)}")
