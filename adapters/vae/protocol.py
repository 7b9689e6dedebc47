"""The small protocol a plain torch VAE follows to be served by the VAE adapter.

    class MyVAE(nn.Module):
        latent_dim = 8                        # latent size (channels, for spatial latents)
        spatial_latent = False                # optional: True when mu is [batch, latent_dim, h, w]
        encoder_blocks: nn.ModuleList         # optional: modules whose outputs are `encoder.block.<i>`
        decoder_blocks: nn.ModuleList         # optional: modules whose outputs are `decoder.block.<i>`

        def encode(self, x):                  # images [batch, C, H, W] -> (mu, logvar)
            ...
        def decode(self, z):                  # latents -> images [batch, C, H, W]
            ...

``encode`` and ``decode`` are ordinary methods, not ``forward``: the adapter calls them itself
(``encode`` -> ``z = mu`` or a seeded sample -> ``decode``), so the latent sites do not need modules.
Blocks must be ``nn.Module`` s that the two methods call, each returning a feature map
``[batch, channel, h, w]``; they are listed in the order the forward pass runs them.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

__all__ = ["TorchVAE"]


@runtime_checkable
class TorchVAE(Protocol):
    """A plain torch VAE the ``vae`` adapter serves (see the module docstring for the optional parts)."""

    latent_dim: int

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images ``[batch, C, H, W]`` -> the posterior's ``(mu, logvar)``, each ``[batch, latent_dim]``
        (or ``[batch, latent_dim, h, w]`` when ``spatial_latent`` is True)."""
        ...

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents shaped like ``mu`` -> reconstructions ``[batch, C, H, W]``."""
        ...
