"""A tiny random LLaVA (CLIP vision tower, projector, Llama LM with grouped-query attention) and inputs."""

from __future__ import annotations

import torch

from conftest import randomize

IMAGE_TOKEN = 63
IMAGE_TOKENS = 16  # (16 / 4) ** 2 patches, the class token dropped ("default" feature selection)


def tiny_llava(seed: int = 0, **text):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=16, patch_size=4, projection_dim=32)
    options = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    options.update(text)
    config = LlavaConfig(vision_config=vision, text_config=LlamaConfig(**options), image_token_index=IMAGE_TOKEN,
                         vision_feature_layer=-1, vision_feature_select_strategy="default")
    model = LlavaForConditionalGeneration(config).eval()
    return randomize(model)  # random biases and norm scales: their defaults (0, 1) would hide bugs


def vlm_inputs(rows: int = 2, seed: int = 1, before: int = 2, after: int = 6, pad: int = 0) -> dict:
    """``rows`` prompts ``[bos, text x before-1, image x 16, text x after]`` with random images; the
    question is the text after the image. With ``pad``, row 0 is padded on the left by ``pad`` tokens."""
    g = torch.Generator().manual_seed(seed)
    text_before = torch.randint(3, 60, (rows, before - 1), generator=g)
    text_after = torch.randint(3, 60, (rows, after), generator=g)
    ids = torch.cat([torch.ones(rows, 1, dtype=torch.long), text_before,
                     torch.full((rows, IMAGE_TOKENS), IMAGE_TOKEN), text_after], dim=1)
    mask = torch.ones_like(ids)
    if pad:
        ids = torch.cat([torch.zeros(rows, pad, dtype=torch.long), ids], dim=1)
        mask = torch.cat([torch.zeros(rows, pad, dtype=torch.long), mask], dim=1)
        for r in range(1, rows):  # only row 0 is padded: shift the others left, pad them on the right? no: fill
            ids[r] = torch.cat([ids[r, pad:], torch.randint(3, 60, (pad,), generator=g)])
            mask[r] = 1
    start = before + IMAGE_TOKENS
    return {
        "input_ids": ids, "attention_mask": mask,
        "pixel_values": torch.randn(rows, 3, 16, 16, generator=g),
        "groups": {"question": [(start + (pad if r == 0 else 0), start + after + (pad if r == 0 else 0)) for r in range(rows)]},
    }
