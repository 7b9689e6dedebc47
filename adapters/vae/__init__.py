"""VAEs: diffusers ``AutoencoderKL`` (any config) and plain torch VAEs following :class:`TorchVAE`.

Sites: ``encoder.block.<i>``, ``encoder.mid.head_out`` / ``attn_out`` / ``encoder.mid``, ``latent.mu``,
``latent.logvar``, ``latent.z``, ``decoder.mid.head_out`` / ``attn_out`` / ``decoder.mid``,
``decoder.block.<i>`` and ``recon`` (the mid-block ones only for ``AutoencoderKL``). See docs/vae.md.
"""

from .adapter import VAEAdapter, VAEOutput
from .models import ConvVAE
from .protocol import TorchVAE

__all__ = ["VAEAdapter", "VAEOutput", "TorchVAE", "ConvVAE"]
