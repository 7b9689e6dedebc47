"""The VAE adapter: diffusers ``AutoencoderKL`` (any config) and plain torch VAEs (:class:`TorchVAE`).

Inputs (:meth:`VAEAdapter.prepare`):

* a tensor, a ``ShapeBatch`` (its ``images``) or ``{"images": x}``: encode, ``z = mu``, decode.
* ``{"images": x, "sample_seed": s}``: ``z = mu + exp(logvar / 2) * eps`` with ``eps`` drawn once
  from ``s`` (on the CPU, so every device gets the same draw); ``{"images": x, "noise": eps}`` gives
  ``eps`` yourself. ``eps`` is an input tensor, so sweeps that tile the batch reuse each row's draw.
* ``{"latents": z}``: decode only, the way pipelines call ``vae.decode()``; decoder-side sites
  (``latent.z``, ``decoder.*``, ``recon``) fire, encoder-side ones do not exist in this run.

Images are never rescaled: give the range the model was trained on (diffusers' pretrained VAEs use
[-1, 1]; the crosspatch zoo uses [0, 1]).
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from crosspatch.engine.adapter import Adapter, AdapterError, Inputs, model_device
from crosspatch.sites.catalog import Axis, Catalog, SiteFamily
from crosspatch.engine.reach import ModuleInput, ModuleOutput

from .protocol import TorchVAE
from .reaches import BlockOutput, ChannelSlice, MidAttention, Point, through

__all__ = ["VAEAdapter", "VAEOutput"]

_DIFFUSERS_KL = "diffusers.models.autoencoders.autoencoder_kl"


@dataclass
class VAEOutput:
    """What a run of the VAE adapter returns: the reconstruction and, when images were encoded,
    the posterior's mean and log-variance (after any intervention on them)."""

    sample: torch.Tensor
    mu: torch.Tensor | None = None
    logvar: torch.Tensor | None = None


def _diffusers_kl_class():
    module = sys.modules.get(_DIFFUSERS_KL)  # a model of it exists only if it was imported
    return getattr(module, "AutoencoderKL", None) if module is not None else None


def is_diffusers_kl(model: nn.Module) -> bool:
    cls = _diffusers_kl_class()
    return cls is not None and isinstance(model, cls)


def _float_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.get_default_dtype()


def _channel_axis(sizes: list[int]) -> Axis:
    """A channel axis with a size when every layer has the same number of channels."""
    return Axis("channel", sizes[0] if sizes and len(set(sizes)) == 1 else None)


class VAEAdapter(Adapter):
    """diffusers ``AutoencoderKL`` and plain torch VAEs that follow :class:`TorchVAE`."""

    name = "vae"

    # ------------------------------------------------------------------ matching and catalog

    def matches(self, model: nn.Module) -> bool:
        return is_diffusers_kl(model) or isinstance(model, TorchVAE)

    def catalog(self, model: nn.Module) -> Catalog:
        if is_diffusers_kl(model):
            return self._diffusers_catalog(model)
        if isinstance(model, TorchVAE):
            return self._protocol_catalog(model)
        raise AdapterError(
            f"the vae adapter serves diffusers AutoencoderKL and torch modules with encode(x) -> (mu, logvar), "
            f"decode(z) and latent_dim (crosspatch.adapters.vae.TorchVAE); {type(model).__name__} is neither"
        )

    def _diffusers_catalog(self, vae: nn.Module) -> Catalog:
        config = vae.config
        c = int(config.latent_channels)
        blocks = list(config.block_out_channels)
        spatial = (Axis("h"), Axis("w"))
        latent = (Axis("dim", c), *spatial)
        moments = "quant_conv" if vae.quant_conv is not None else "encoder"
        families = [
            SiteFamily(
                "encoder.block", (_channel_axis(blocks), *spatial), ModuleOutput(vae, "encoder.down_blocks.{layer}"),
                len(vae.encoder.down_blocks), "output of encoder down block <layer>",
            ),
        ]
        families += self._mid_families(vae, "encoder", blocks[-1])
        families += [
            SiteFamily("latent.mu", latent, ChannelSlice(vae, moments, 0, c), doc=f"posterior mean ({moments} output, first half)"),
            SiteFamily("latent.logvar", latent, ChannelSlice(vae, moments, c, 2 * c),
                       doc=f"posterior log-variance, before diffusers clamps it to [-30, 20] ({moments} output, second half)"),
            SiteFamily(
                "latent.z", latent,
                ModuleInput(vae, "post_quant_conv", name=None) if vae.post_quant_conv is not None
                else ModuleInput(vae, "decoder", name="sample"),
                doc="the latent the decoder receives (post_quant_conv input, or decoder input without it)",
            ),
        ]
        families += self._mid_families(vae, "decoder", blocks[-1])
        families += [
            SiteFamily(
                "decoder.block", (_channel_axis(blocks[::-1]), *spatial), ModuleOutput(vae, "decoder.up_blocks.{layer}"),
                len(vae.decoder.up_blocks), "output of decoder up block <layer>",
            ),
            SiteFamily("recon", (Axis("channel", int(config.out_channels)), *spatial), ModuleOutput(vae, "decoder"),
                       doc="the reconstruction (decoder output)"),
        ]
        return Catalog(families, type(vae).__name__)

    @staticmethod
    def _mid_families(vae: nn.Module, side: str, channels: int) -> list[SiteFamily]:
        spatial = (Axis("h"), Axis("w"))
        mid = getattr(vae, side).mid_block
        out = []
        attentions = [a for a in getattr(mid, "attentions", []) if a is not None]
        if attentions:
            attn = attentions[0]
            path = f"{side}.mid_block.attentions.0"
            width = attn.to_out[0].out_features
            out += [
                SiteFamily(
                    f"{side}.mid.head_out", (Axis("head", int(attn.heads)), Axis("channel", width), *spatial),
                    MidAttention(vae, path, per_head=True), doc="each mid-block attention head's write (heads + bias = attn_out)",
                ),
                SiteFamily(
                    f"{side}.mid.attn_out", (Axis("channel", width), *spatial), MidAttention(vae, path, per_head=False),
                    doc="mid-block attention output, before the residual is added",
                ),
            ]
        out.append(
            SiteFamily(f"{side}.mid", (Axis("channel", channels), *spatial), ModuleOutput(vae, f"{side}.mid_block"),
                       doc=f"{side} mid-block output")
        )
        return out

    def _protocol_catalog(self, model: nn.Module) -> Catalog:
        dim = int(model.latent_dim)
        spatial = bool(getattr(model, "spatial_latent", False))
        latent = (Axis("dim", dim), Axis("h"), Axis("w")) if spatial else (Axis("dim", dim),)
        feature = (Axis("channel"), Axis("h"), Axis("w"))
        families = []
        enc = self._blocks(model, "encoder_blocks")
        if enc:
            families.append(SiteFamily("encoder.block", feature, BlockOutput(enc, "encoder_blocks"), len(enc),
                                       "output of encoder_blocks[<layer>]"))
        families += [
            SiteFamily("latent.mu", latent, Point(model, "latent.mu"), doc="posterior mean (encode()[0])"),
            SiteFamily("latent.logvar", latent, Point(model, "latent.logvar"), doc="posterior log-variance (encode()[1])"),
            SiteFamily("latent.z", latent, Point(model, "latent.z"), doc="the latent passed to decode()"),
        ]
        dec = self._blocks(model, "decoder_blocks")
        if dec:
            families.append(SiteFamily("decoder.block", feature, BlockOutput(dec, "decoder_blocks"), len(dec),
                                       "output of decoder_blocks[<layer>]"))
        families.append(SiteFamily("recon", feature, Point(model, "recon"), doc="the reconstruction (decode() output)"))
        return Catalog(families, type(model).__name__)

    @staticmethod
    def _blocks(model: nn.Module, attr: str) -> list[nn.Module]:
        blocks = getattr(model, attr, None)
        if blocks is None:
            return []
        blocks = list(blocks)
        bad = [i for i, b in enumerate(blocks) if not isinstance(b, nn.Module)]
        if bad:
            raise AdapterError(f"{type(model).__name__}.{attr}[{bad[0]}] is not an nn.Module; list the block modules")
        return blocks

    # ------------------------------------------------------------------ inputs

    def prepare(self, model: nn.Module, inputs: Any) -> Inputs:
        if isinstance(inputs, torch.Tensor):
            data: dict[str, Any] = {"images": inputs}
        elif isinstance(getattr(inputs, "images", None), torch.Tensor):  # a ShapeBatch
            data = {"images": inputs.images}
        elif isinstance(inputs, Mapping):
            data = dict(inputs)
        else:
            raise TypeError(
                f"VAE inputs are an image tensor, {{'images': x}} or {{'latents': z}}; got {type(inputs).__name__}"
            )
        unknown = set(data) - {"images", "latents", "noise", "sample_seed"}
        if unknown:
            raise ValueError(f"unknown VAE input keys {sorted(unknown)}; use images, latents, noise or sample_seed")
        if ("images" in data) == ("latents" in data):
            raise ValueError("give exactly one of 'images' (encode, then decode) and 'latents' (decode only)")
        if "latents" in data and ({"noise", "sample_seed"} & set(data)):
            raise ValueError("'noise' and 'sample_seed' sample z from the posterior; they need 'images', not 'latents'")
        if "noise" in data and "sample_seed" in data:
            raise ValueError("give 'noise' or 'sample_seed', not both")
        device, dtype = model_device(model), _float_dtype(model)
        key = "images" if "images" in data else "latents"
        x = torch.as_tensor(data[key]).to(device=device, dtype=dtype)
        out: dict[str, Any] = {key: x}
        if "noise" in data:
            noise = torch.as_tensor(data["noise"]).to(device=device, dtype=dtype)
            if noise.shape[0] != x.shape[0]:
                raise ValueError(f"'noise' has {noise.shape[0]} rows but the images have {x.shape[0]}")
            out["noise"] = noise
        elif data.get("sample_seed") is not None:
            seed = data["sample_seed"]
            if not isinstance(seed, int) or isinstance(seed, bool):
                raise TypeError(f"sample_seed must be an int, got {seed!r}")
            shape = (x.shape[0], *self._latent_shape(model, x))
            gen = torch.Generator().manual_seed(seed)
            out["noise"] = torch.randn(shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)
        return out

    def _latent_shape(self, model: nn.Module, images: torch.Tensor) -> tuple[int, ...]:
        if is_diffusers_kl(model):
            h, w = images.shape[-2:]
            for _ in range(len(model.encoder.down_blocks) - 1):  # each downsample: floor(size / 2)
                h, w = h // 2, w // 2
            return (int(model.config.latent_channels), h, w)
        if not getattr(model, "spatial_latent", False):
            return (int(model.latent_dim),)
        with torch.no_grad():  # a spatial latent's size depends on the image: ask the encoder once
            mu, _ = model.encode(images[:1])
        return tuple(mu.shape[1:])

    # ------------------------------------------------------------------ forward

    def forward(self, model: nn.Module, inputs: Inputs) -> VAEOutput:
        if is_diffusers_kl(model):
            return self._forward_diffusers(model, inputs)
        return self._forward_protocol(model, inputs)

    def output(self, raw: Any) -> torch.Tensor:
        return raw.sample

    def _forward_diffusers(self, vae: nn.Module, inputs: Inputs) -> VAEOutput:
        mu = logvar = None
        with _unsliced(vae):
            if "images" in inputs:
                x = inputs["images"]
                _check_tiling(vae, x.shape[-2:], vae.tile_sample_min_size, "encode", "images")
                posterior = vae.encode(x).latent_dist
                mu, logvar = posterior.mean, posterior.logvar
                noise = inputs.get("noise")
                z = mu if noise is None else mu + posterior.std * noise
            else:
                z = inputs["latents"]
            _check_tiling(vae, z.shape[-2:], vae.tile_latent_min_size, "decode", "latents")
            recon = vae.decode(z).sample
        return VAEOutput(recon, mu, logvar)

    def _forward_protocol(self, model: nn.Module, inputs: Inputs) -> VAEOutput:
        mu = logvar = None
        if "images" in inputs:
            encoded = model.encode(inputs["images"])
            if not (isinstance(encoded, (tuple, list)) and len(encoded) == 2):
                raise AdapterError(
                    f"{type(model).__name__}.encode must return (mu, logvar) to follow the TorchVAE protocol; "
                    f"it returned {type(encoded).__name__}"
                )
            mu = through(model, "latent.mu", encoded[0])
            logvar = through(model, "latent.logvar", encoded[1])
            noise = inputs.get("noise")
            z = mu if noise is None else mu + torch.exp(0.5 * logvar) * noise
        else:
            z = inputs["latents"]
        z = through(model, "latent.z", z)
        recon = through(model, "recon", model.decode(z))
        return VAEOutput(recon, mu, logvar)

    # ------------------------------------------------------------------ description

    def describe(self, model: nn.Module) -> dict[str, Any]:
        if is_diffusers_kl(model):
            config = model.config
            return {
                "class": type(model).__name__,
                "kind": "diffusers",
                "latent_channels": int(config.latent_channels),
                "block_out_channels": list(config.block_out_channels),
                "use_quant_conv": model.quant_conv is not None,
                "use_post_quant_conv": model.post_quant_conv is not None,
                "dtype": str(_float_dtype(model)).removeprefix("torch."),
            }
        return {
            "class": type(model).__name__,
            "kind": "torch",
            "latent_dim": int(model.latent_dim),
            "spatial_latent": bool(getattr(model, "spatial_latent", False)),
            "encoder_blocks": len(self._blocks(model, "encoder_blocks")),
            "decoder_blocks": len(self._blocks(model, "decoder_blocks")),
            "dtype": str(_float_dtype(model)).removeprefix("torch."),
        }


@contextlib.contextmanager
def _unsliced(vae: nn.Module):
    """Run the batch in one piece while ``use_slicing`` is on.

    Slicing runs encode / decode one row at a time: the same numbers, less memory. Hooks would then
    fire once per row and bind interventions to the wrong rows, so the run is unsliced instead.
    """
    sliced = bool(getattr(vae, "use_slicing", False))
    if sliced:
        vae.use_slicing = False
    try:
        yield
    finally:
        if sliced:
            vae.use_slicing = True


def _check_tiling(vae: nn.Module, size, tile, what: str, key: str) -> None:
    if not getattr(vae, "use_tiling", False):
        return
    tile_h, tile_w = (tile, tile) if isinstance(tile, int) else tuple(tile)
    if size[0] > tile_h or size[1] > tile_w:
        raise AdapterError(
            f"AutoencoderKL.use_tiling is on and the {key} ({size[0]}x{size[1]}) are larger than a tile "
            f"({tile_h}x{tile_w}), so {what} would run the network once per overlapping tile and blend the "
            f"results: sites would hold one tile at a time and could not be captured or patched as one tensor. "
            f"Call vae.disable_tiling() for crosspatch runs, or give inputs no larger than one tile."
        )
