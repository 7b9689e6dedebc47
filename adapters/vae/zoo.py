"""Zoo models of the VAE adapter, trained here on ShapesTask images (32x32, colours in [0, 1]).

``shapes-vae``
    :class:`~crosspatch.adapters.vae.models.ConvVAE` (plain torch, the :class:`TorchVAE` protocol),
    8 latents, β = 4: a β-VAE whose KL pressure switches unused latents off.
``shapes-vae-beta1``
    The same recipe with β = 1 (a plain VAE), to compare against β = 4.
``shapes-vae-kl``
    A tiny diffusers ``AutoencoderKL`` (blocks 8/16/32, one mid-block attention head, 4 latent
    channels on an 8x8 grid), a Gaussian decoder with σ = 0.1 and β = 1.

How training works, and why:

* **Data.** ``ShapesTask().sample(n, seed=seed, split="train")`` rendered once (train split, so the
  held-out (shape, colour) combinations stay unseen and ``recon_mse_test`` measures generalisation
  to them); batches are drawn from it with a seeded generator.
* **Loss.** The ConvVAE decodes Bernoulli logits: binary cross-entropy summed over pixels plus β
  times the KL to N(0, I), per image. ``AutoencoderKL`` decodes pixel values: squared error summed
  over pixels divided by 2σ² plus the KL. β ramps up from 0 over the first 10% of steps (KL warm-up),
  so the latents are in use before the KL pressure starts switching some off.
* **One intra-op thread.** These convolutions are tiny: a second thread gains little and, on a
  busy two-core machine, costs several times over in spin-waits. One thread also makes the weights
  the same for the same seed on every machine with the same torch.
* **Metrics** (in the manifest and ``Loaded.info``): reconstruction MSE on held-out train-split and
  test-split images, the KL of each latent (``kl_per_latent``, nats) and the number of latents whose
  KL exceeds 0.1 nats (``active_latents``), training seconds.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from crosspatch.results.tensor_folder import TensorFolder, write_json
from crosspatch.zoo.store import Loaded, TrainSettings, ZooModel

if TYPE_CHECKING:
    from .models import ConvVAE

__all__ = ["ZOO_MODELS", "VAERecipe", "KLRecipe", "build_conv_vae", "load_conv_vae", "save_conv_vae", "build_kl_vae",
           "load_kl_vae"]

logger = logging.getLogger(__name__)

_CONFIG = "crosspatch_vae.json"
_CONV_FOLDER = TensorFolder(_CONFIG, "model.safetensors", "a ConvVAE", sort_keys=True)
_ACTIVE_NATS = 0.1


@dataclass(frozen=True)
class VAERecipe:
    """Architecture and optimisation of a ConvVAE zoo model."""

    latent_dim: int = 8
    channels: tuple[int, int, int] = (16, 32, 32)
    hidden: int = 128
    beta: float = 4.0
    steps: int = 2000
    batch_size: int = 64
    lr: float = 2e-3
    warmup_fraction: float = 0.1
    dataset_size: int = 16384
    eval_images: int = 512


@dataclass(frozen=True)
class KLRecipe:
    """Architecture and optimisation of the AutoencoderKL zoo model."""

    block_out_channels: tuple[int, ...] = (8, 16, 32)
    latent_channels: int = 4
    norm_num_groups: int = 4
    sigma: float = 0.1
    beta: float = 1.0
    steps: int = 500
    batch_size: int = 32
    lr: float = 2e-3
    warmup_fraction: float = 0.1
    dataset_size: int = 16384
    eval_images: int = 256


# ------------------------------------------------------------------ shared pieces


class _OneThread:
    def __enter__(self):
        import torch

        self.before = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        import torch

        torch.set_num_threads(self.before)


def _data(settings: TrainSettings, size: int, steps: int, batch: int):
    """Train-split images (at most what training will draw) and a seeded generator for batches."""
    import torch

    from crosspatch.zoo.tasks import ShapesTask

    task = ShapesTask()
    n = min(size, steps * batch)
    images = task.sample(n, seed=settings.seed, split="train").images
    gen = torch.Generator().manual_seed(settings.seed + 1)
    return task, images, gen


def _eval_images(task, n: int, seed: int, steps: int, batch: int):
    """Held-out images of both splits; a short build (tests) evaluates on no more than it trained on."""
    n = max(16, min(n, steps * batch))
    return {split: task.sample(n, seed=50_000 + seed, split=split).images for split in ("train", "test")}


def _kl_terms(mu, logvar):
    """KL(q || N(0, I)) per element."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)


def _beta_at(step: int, steps: int, beta: float, warmup_fraction: float) -> float:
    warm = max(1, round(steps * warmup_fraction))
    return beta * min(1.0, (step + 1) / warm)


def _lr_lambda(steps: int):
    def at(step: int) -> float:  # cosine decay to 10%
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(step, steps) / max(1, steps)))

    return at


# ------------------------------------------------------------------ ConvVAE (plain torch)


def build_conv_vae(folder: Path, settings: TrainSettings, recipe: VAERecipe = VAERecipe()) -> dict[str, Any]:
    """Train a ConvVAE β-VAE into ``folder`` (``model.safetensors`` + ``crosspatch_vae.json``)."""
    import torch
    import torch.nn.functional as F

    from crosspatch.progress import progress_bar

    from .models import ConvVAE

    steps = settings.steps if settings.steps is not None else recipe.steps
    with _OneThread():
        torch.manual_seed(settings.seed)
        task, images, gen = _data(settings, recipe.dataset_size, steps, recipe.batch_size)
        model = ConvVAE(recipe.latent_dim, recipe.channels, recipe.hidden)
        opt = torch.optim.Adam(model.parameters(), lr=recipe.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(steps))
        model.train()
        start = time.perf_counter()
        for step in progress_bar(range(steps), settings.progress, desc=f"training shapes VAE (β={recipe.beta:g})"):
            x = images[torch.randint(len(images), (recipe.batch_size,), generator=gen)]
            mu, logvar = model.encode(x)
            z = mu + torch.exp(0.5 * logvar) * torch.randn(mu.shape, generator=gen)
            rec = F.binary_cross_entropy_with_logits(model.decode_logits(z), x, reduction="sum") / len(x)
            kl = _kl_terms(mu, logvar).sum() / len(x)
            loss = rec + _beta_at(step, steps, recipe.beta, recipe.warmup_fraction) * kl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if step % 500 == 0:
                logger.debug("step %d: reconstruction %.2f, KL %.2f", step, rec.item(), kl.item())
        seconds = time.perf_counter() - start
        model.eval()
        metrics = _conv_metrics(model, task, recipe, settings.seed, steps)
    save_conv_vae(folder, model, recipe)
    metrics.update({"task": "shapes", "beta": recipe.beta, "steps": steps, "batch_size": recipe.batch_size,
                    "train_seconds": round(seconds, 2), "parameters": sum(p.numel() for p in model.parameters()),
                    "pixel_range": [0.0, 1.0]})
    return metrics


def _conv_metrics(model, task, recipe: VAERecipe, seed: int, steps: int) -> dict[str, Any]:
    import torch

    out: dict[str, Any] = {}
    with torch.inference_mode():
        for split, x in _eval_images(task, recipe.eval_images, seed, steps, recipe.batch_size).items():
            mu, logvar = model.encode(x)
            out[f"recon_mse_{split}"] = float((model.decode(mu) - x).pow(2).mean())
            if split == "train":
                kl = _kl_terms(mu, logvar).mean(dim=0)
                out["kl_per_latent"] = [round(float(v), 4) for v in kl]
                out["active_latents"] = int((kl > _ACTIVE_NATS).sum())
    return out


def save_conv_vae(folder: Path, model: "ConvVAE", recipe: VAERecipe) -> Path:
    """Write a ConvVAE trained by ``recipe`` as a zoo folder (``model.safetensors`` + ``crosspatch_vae.json``)."""
    return _CONV_FOLDER.write(folder, {"kind": "conv_vae", "model": model.config, "recipe": asdict(recipe)},
                              model.state_dict())


def load_conv_vae(folder: Path | None) -> Loaded:
    """A ConvVAE zoo folder -> ``Loaded`` (the model in eval mode, no tokenizer)."""
    from .models import ConvVAE

    if folder is None:
        raise ValueError("ConvVAE zoo models load from the folder their build wrote")
    config, tensors = _CONV_FOLDER.read(folder)
    spec = dict(config["model"])
    spec["channels"] = tuple(spec["channels"])
    model = ConvVAE(**spec)
    model.load_state_dict(tensors)
    return Loaded(model.eval(), None, {"beta": config["recipe"]["beta"], "pixel_range": [0.0, 1.0]})


# ------------------------------------------------------------------ AutoencoderKL (diffusers)


def kl_config(recipe: KLRecipe = KLRecipe()) -> dict[str, Any]:
    """The ``AutoencoderKL`` config of ``shapes-vae-kl``."""
    n = len(recipe.block_out_channels)
    return dict(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(recipe.block_out_channels),
        layers_per_block=1, latent_channels=recipe.latent_channels, norm_num_groups=recipe.norm_num_groups,
        sample_size=32,
    )


def build_kl_vae(folder: Path, settings: TrainSettings, recipe: KLRecipe = KLRecipe()) -> dict[str, Any]:
    """Train the tiny ``AutoencoderKL`` into ``folder`` (diffusers ``save_pretrained`` layout)."""
    import torch
    from diffusers import AutoencoderKL

    from crosspatch.progress import progress_bar

    steps = settings.steps if settings.steps is not None else recipe.steps
    with _OneThread():
        torch.manual_seed(settings.seed)
        task, images, gen = _data(settings, recipe.dataset_size, steps, recipe.batch_size)
        vae = AutoencoderKL(**kl_config(recipe))
        opt = torch.optim.Adam(vae.parameters(), lr=recipe.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(steps))
        vae.train()
        scale = 1.0 / (2 * recipe.sigma**2)
        start = time.perf_counter()
        for step in progress_bar(range(steps), settings.progress, desc="training shapes AutoencoderKL"):
            x = images[torch.randint(len(images), (recipe.batch_size,), generator=gen)]
            posterior = vae.encode(x).latent_dist
            z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
            rec = (vae.decode(z).sample - x).pow(2).sum() / len(x) * scale
            kl = _kl_terms(posterior.mean, posterior.logvar).sum() / len(x)
            loss = rec + _beta_at(step, steps, recipe.beta, recipe.warmup_fraction) * kl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if step % 100 == 0:
                logger.debug("step %d: reconstruction %.2f, KL %.2f", step, rec.item(), kl.item())
        seconds = time.perf_counter() - start
        vae.eval()
        metrics: dict[str, Any] = {}
        with torch.inference_mode():
            for split, x in _eval_images(task, recipe.eval_images, settings.seed, steps, recipe.batch_size).items():
                posterior = vae.encode(x).latent_dist
                metrics[f"recon_mse_{split}"] = float((vae.decode(posterior.mean).sample - x).pow(2).mean())
                if split == "train":
                    kl = _kl_terms(posterior.mean, posterior.logvar).mean(dim=0).sum(dim=(1, 2))
                    metrics["kl_per_latent"] = [round(float(v), 4) for v in kl]
                    metrics["active_latents"] = int((kl > _ACTIVE_NATS).sum())
    vae.save_pretrained(folder, safe_serialization=True)
    write_json(folder / _CONFIG, {"kind": "autoencoder_kl", "recipe": asdict(recipe)}, sort_keys=True)
    metrics.update({"task": "shapes", "beta": recipe.beta, "sigma": recipe.sigma, "steps": steps,
                    "batch_size": recipe.batch_size, "train_seconds": round(seconds, 2),
                    "parameters": sum(p.numel() for p in vae.parameters()), "pixel_range": [0.0, 1.0]})
    return metrics


def load_kl_vae(folder: Path | None) -> Loaded:
    """A ``shapes-vae-kl`` folder -> ``Loaded`` (``AutoencoderKL`` in eval mode)."""
    from diffusers import AutoencoderKL

    if folder is None:
        raise ValueError("AutoencoderKL zoo models load from the folder their build wrote")
    vae = AutoencoderKL.from_pretrained(folder, local_files_only=True, low_cpu_mem_usage=False)
    return Loaded(vae.eval(), None, {"pixel_range": [0.0, 1.0]})


# ------------------------------------------------------------------ the zoo entries

BETA1 = replace(VAERecipe(), beta=1.0)

ZOO_MODELS: list[ZooModel] = [
    ZooModel(
        name="shapes-vae",
        description="β-VAE (β=4), plain torch ConvVAE with 8 latents, trained on 32x32 ShapesTask images",
        adapter="vae",
        task="shapes",
        build=build_conv_vae,
        load=load_conv_vae,
        version="1",
    ),
    ZooModel(
        name="shapes-vae-beta1",
        description="the shapes-vae recipe with β=1 (a plain VAE), for comparing against β=4",
        adapter="vae",
        task="shapes",
        build=partial(build_conv_vae, recipe=BETA1),
        load=load_conv_vae,
        version="1",
    ),
    ZooModel(
        name="shapes-vae-kl",
        description="tiny diffusers AutoencoderKL (4 latent channels on 8x8, one mid-block attention head) on ShapesTask",
        adapter="vae",
        task="shapes",
        build=build_kl_vae,
        load=load_kl_vae,
        version="1",
    ),
]
