"""A plain torch β-VAE for 32x32 images: the zoo's ``shapes-vae`` and a reference :class:`TorchVAE`."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ConvVAE"]


class ConvVAE(nn.Module):
    """Convolutional VAE, ``[batch, 3, 32, 32]`` in [0, 1] -> ``latent_dim`` Gaussian latents -> back.

    Encoder: three stride-2 conv blocks (32x32 -> 16 -> 8 -> 4), then two linear layers to
    ``(mu, logvar)``. Decoder: two linear layers, then three stride-2 transposed-conv blocks; the last
    block's output are logits and :meth:`decode` returns their sigmoid. It follows the
    :class:`~crosspatch.adapters.vae.TorchVAE` protocol: ``encode``, ``decode``, ``latent_dim`` and the
    ``encoder_blocks`` / ``decoder_blocks`` whose outputs are the ``encoder.block`` / ``decoder.block`` sites.
    """

    def __init__(self, latent_dim: int = 8, channels: tuple[int, int, int] = (16, 32, 32), hidden: int = 128,
                 image_channels: int = 3, image_size: int = 32):
        super().__init__()
        if image_size % 8:
            raise ValueError(f"image_size must be a multiple of 8, got {image_size}")
        self.latent_dim = latent_dim
        self.config = {"latent_dim": latent_dim, "channels": list(channels), "hidden": hidden,
                       "image_channels": image_channels, "image_size": image_size}
        c1, c2, c3 = channels
        side = image_size // 8
        self._side, self._c3 = side, c3
        self.encoder_blocks = nn.ModuleList([
            nn.Sequential(nn.Conv2d(image_channels, c1, 4, 2, 1), nn.ReLU()),
            nn.Sequential(nn.Conv2d(c1, c2, 4, 2, 1), nn.ReLU()),
            nn.Sequential(nn.Conv2d(c2, c3, 4, 2, 1), nn.ReLU()),
        ])
        self.to_moments = nn.Sequential(
            nn.Flatten(), nn.Linear(c3 * side * side, hidden), nn.ReLU(), nn.Linear(hidden, 2 * latent_dim)
        )
        self.from_latent = nn.Sequential(
            nn.Linear(latent_dim, hidden), nn.ReLU(), nn.Linear(hidden, c3 * side * side), nn.ReLU()
        )
        self.decoder_blocks = nn.ModuleList([
            nn.Sequential(nn.ConvTranspose2d(c3, c2, 4, 2, 1), nn.ReLU()),
            nn.Sequential(nn.ConvTranspose2d(c2, c1, 4, 2, 1), nn.ReLU()),
            nn.ConvTranspose2d(c1, image_channels, 4, 2, 1),
        ])

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for block in self.encoder_blocks:
            x = block(x)
        mu, logvar = self.to_moments(x).chunk(2, dim=1)
        return mu, logvar

    def decode_logits(self, z: torch.Tensor) -> torch.Tensor:
        h = self.from_latent(z).view(z.shape[0], self._c3, self._side, self._side)
        for block in self.decoder_blocks:
            h = block(h)
        return h

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.decode_logits(z))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction from the posterior mean (the adapter does not call this)."""
        return self.decode(self.encode(x)[0])
