"""Tiny VAEs for the VAE adapter tests: a diffusers AutoencoderKL from a config, and hand-built toys."""

from __future__ import annotations

import torch
from torch import nn


def tiny_kl(seed: int = 0, **overrides):
    """An AutoencoderKL on 16x16 images: two blocks (8, 16 channels), 3 latent channels on 8x8."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    config = dict(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
        latent_channels=3, norm_num_groups=4, sample_size=16,
    )
    config.update(overrides)
    vae = AutoencoderKL(**config).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # biases init to 0 and norm weights to 1, which would hide bias and scale bugs
        for name, p in vae.named_parameters():
            if name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            elif "norm" in name and name.endswith(".weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
    return vae


def images(n: int = 3, size: int = 16, seed: int = 5, dtype=torch.float32) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=dtype)


class LinearVAE(nn.Module):
    """A TorchVAE whose decoder is a fixed matrix: ``decode(z) = (z @ W.T + b).view(n, *shape)``.

    ``encode(x) = (x.flatten(1) @ E.T, 0)``: with ``E`` the identity, latent ``k`` is input ``k``.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, shape=None, encoder: torch.Tensor | None = None):
        super().__init__()
        out, d = weight.shape
        self.latent_dim = d
        self.shape = tuple(shape) if shape is not None else (out,)
        self.weight = nn.Parameter(weight.clone(), requires_grad=False)
        self.bias = nn.Parameter(bias.clone() if bias is not None else torch.zeros(out, dtype=weight.dtype),
                                 requires_grad=False)
        enc = encoder if encoder is not None else torch.eye(d, dtype=weight.dtype)
        self.encoder_matrix = nn.Parameter(enc.clone(), requires_grad=False)

    def encode(self, x):
        mu = x.flatten(1) @ self.encoder_matrix.T
        return mu, torch.zeros_like(mu)

    def decode(self, z):
        return (z @ self.weight.T + self.bias).view(z.shape[0], *self.shape)
