"""Tiny random vision-language models (LLaVA, PaliGemma, Idefics3) with random biases and norm scales, and their inputs."""

from __future__ import annotations

import torch

from conftest import randomize

from crosspatch.adapters.vlm.tiny import IMAGE_TOKEN, tiny_model

IMAGE_TOKENS = 16  # (16 / 4) ** 2 patches, the class token dropped ("default" feature selection)


def tiny_llava(seed: int = 0, vision_layers: int = 2, vision_feature_layer: int = -1, **text):
    """LLaVA: CLIP vision tower (class token dropped), two-layer MLP projector, Llama LM; random biases and norm
    scales (their defaults, 0 and 1, would hide bugs)."""
    text = {"num_hidden_layers": 3, **text}
    return randomize(tiny_model("llava", seed, {"num_hidden_layers": vision_layers}, text,
                                vision_feature_layer=vision_feature_layer))


def vlm_inputs(rows: int = 2, seed: int = 1, before: int = 2, after: int = 6, pad: int = 0) -> dict:
    """``rows`` prompts ``[bos, text x before-1, image x 16, text x after]`` with random images and the text
    after the image as the group ``question``. With ``pad``, row 0 is padded on the left by ``pad`` tokens
    and the other rows end with ``pad`` more text tokens, so the groups sit in different columns per row."""
    g = torch.Generator().manual_seed(seed)
    ids, masks, spans = [], [], []
    for r in range(rows):
        prompt = torch.cat([torch.ones(1, dtype=torch.long), torch.randint(3, 60, (before - 1,), generator=g),
                            torch.full((IMAGE_TOKENS,), IMAGE_TOKEN), torch.randint(3, 60, (after,), generator=g)])
        shift = pad if r == 0 else 0
        extra = torch.randint(3, 60, (0 if r == 0 else pad,), generator=g)
        ids.append(torch.cat([torch.zeros(shift, dtype=torch.long), prompt, extra]))
        masks.append(torch.cat([torch.zeros(shift, dtype=torch.long), torch.ones(len(prompt) + len(extra), dtype=torch.long)]))
        start = shift + before + IMAGE_TOKENS
        spans.append((start, start + after))
    return {
        "input_ids": torch.stack(ids), "attention_mask": torch.stack(masks),
        "pixel_values": torch.randn(rows, 3, 16, 16, generator=g),
        "groups": {"question": spans},
    }


def tiny_paligemma(seed: int = 0):
    """PaliGemma: SigLIP tower (16 patches, no class token), linear projector, Gemma LM whose prefix (token type 0:
    image and prompt) attends both ways."""
    return randomize(tiny_model("paligemma", seed))


def paligemma_inputs(rows: int = 2, seed: int = 1, prompt: int = 4, answer: int = 2) -> dict:
    """``[image x 16, bos, prompt x (prompt-1), answer tokens]``: the image and the prompt are the prefix
    (token type 0), the answer tokens the suffix; the prompt is the group ``question``."""
    raw = vlm_inputs(rows, seed, before=1, after=prompt - 1 + answer)
    ids = raw["input_ids"]  # [bos, image ..., text ...]: PaliGemma puts the image first, then bos
    ids = torch.cat([ids[:, 1:IMAGE_TOKENS + 1], ids[:, :1], ids[:, IMAGE_TOKENS + 1:]], dim=1)
    types = torch.zeros_like(ids)
    types[:, IMAGE_TOKENS + prompt:] = 1
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": types,
            "pixel_values": raw["pixel_values"], "groups": {"question": (IMAGE_TOKENS, IMAGE_TOKENS + prompt)}}


def tiny_idefics3(seed: int = 0):
    """Idefics3 (SmolVLM): SigLIP-style tower, pixel-shuffle connector folding 4 patches into each of 4 image tokens."""
    return randomize(tiny_model("idefics3", seed))


def idefics3_inputs(rows: int = 2, seed: int = 1) -> dict:
    """``[bos, text, image x 4, question x 6]`` with one image per row ``[rows, 1, 3, 16, 16]``."""
    raw = vlm_inputs(rows, seed)
    ids = torch.cat([raw["input_ids"][:, :2 + 4], raw["input_ids"][:, 2 + IMAGE_TOKENS:]], dim=1)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": raw["pixel_values"].unsqueeze(1),
            "groups": {"question": (6, 12)}}
