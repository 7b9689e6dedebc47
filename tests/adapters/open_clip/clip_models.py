"""Tiny open_clip and HuggingFace CLIP models for the tests (built from configs, no downloads)."""

from __future__ import annotations

import torch

IMAGE, PATCH, CONTEXT, VOCAB = 16, 8, 10, 100
EOT = VOCAB - 1  # the highest id, where open_clip's argmax pooling reads the caption


def tiny_open_clip(seed: int = 0, dtype=torch.float32, sharpen: bool = True, **vision_extra):
    """2 + 2 layers, 4 heads, width 32; random biases and norm weights (they init to 0 and 1);
    ``sharpen`` scales the query/key/value weights by 4 so that pattern and head edits matter."""
    import open_clip

    torch.manual_seed(seed)
    model = open_clip.CLIP(
        embed_dim=24,
        vision_cfg=dict(image_size=IMAGE, patch_size=PATCH, width=32, layers=2, head_width=8, mlp_ratio=2, **vision_extra),
        text_cfg=dict(context_length=CONTEXT, vocab_size=VOCAB, width=32, heads=4, layers=2, mlp_ratio=2),
    )
    gen = torch.Generator().manual_seed(seed + 3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
            elif (".ln_" in name or name.startswith("ln_")) and name.endswith("weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen))
            elif name.endswith("in_proj_weight") and sharpen:
                p.mul_(4)
    return model.to(dtype).eval()


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed))


def texts(n: int, seed: int = 0, length: int = 7) -> torch.Tensor:
    """Token ids padded with 0 like open_clip's tokenizer, the end token at ``length``."""
    ids = torch.randint(1, EOT - 1, (n, CONTEXT), generator=torch.Generator().manual_seed(seed))
    ids[:, length] = EOT
    ids[:, length + 1 :] = 0
    return ids
