"""Steer a shapes VAE to the right: a difference-of-means vector, added at three sites, as an effect curve.

The model is `shapes-vae` from the crosspatch zoo (a small β-VAE over 32x32 images of one coloured
shape; trained on your CPU the first time, then cached). The same two calls that steer a language
model's residual stream steer it, because they only speak in sites:

  1. `steering_vector`: mean activation over images whose shape sits on the right, minus the mean
     over images whose shape sits on the left (all other factors random), at a site;
  2. `steering_curve`: add alpha * vector at that site, for alpha from -1.5 to 1.5, all strengths in
     one batched forward, and measure where the reconstruction's brightness is centred
     (the x centre of mass, in pixels), relative to the unsteered run.

Alpha = 1 adds exactly the left/right difference of the means. On this model all three sites give a
monotone curve through 0 at alpha = 0 (about +6 px at alpha = 1 on the held-out images, which start
anywhere along x, so it saturates as shapes reach the edge). The sites: the latent code (`latent.z`), the last encoder
block (`encoder.block.2`, a 4x4 map: the vector keeps its spatial layout) and the first decoder block.

    python examples/steering_study.py --out crosspatch-out/steering
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

import crosspatch as cp
from crosspatch.results.report import write_report
from crosspatch.zoo import store as zoo
from crosspatch.methods.steering import plot_curve, steering_curve
from crosspatch.zoo.tasks import ShapesTask

MODEL = "shapes-vae"
SITES = ["latent.z", "encoder.block.2", "decoder.block.0"]
ALPHAS = np.round(np.linspace(-1.5, 1.5, 7), 2).tolist()


def x_centre(recon: torch.Tensor) -> torch.Tensor:
    """Horizontal centre of mass of the reconstruction's brightness, in pixels, one per image."""
    brightness = recon.clamp(0, 1).sum(dim=1)  # [n, h, w]
    cols = torch.arange(brightness.shape[-1], device=recon.device, dtype=brightness.dtype)
    return (brightness.sum(dim=1) * cols).sum(-1) / brightness.sum(dim=(1, 2)).clamp_min(1e-6)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("crosspatch-out/steering"), help="folder for PNG + JSON")
    parser.add_argument("--n", type=int, default=128, help="images per side of the contrast")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    start = time.perf_counter()
    if not zoo.cached(MODEL, seed=args.seed):
        print(f"training {MODEL} on first use: two to three minutes on a CPU; cached afterwards...")
    m = cp.wrap(zoo.load(MODEL, seed=args.seed).model)

    task = ShapesTask()
    sample = task.sample(6 * args.n, seed=args.seed, split="train")
    x = sample.factors["x"]
    left, right = x == 0, x == len(task.values["x"]) - 1
    positive, negative = sample.images[right][: args.n], sample.images[left][: args.n]
    probe = task.sample(32, seed=args.seed + 1, split="test").images  # the images we steer
    print(f"contrast: {len(positive)} images on the {task.values['x'][-1]!r} side vs {len(negative)} on the "
          f"{task.values['x'][0]!r} side; shift of the mean x centre = "
          f"{float(x_centre(positive).mean() - x_centre(negative).mean()):.1f} px")

    res = steering_curve(m, probe, SITES, ALPHAS, x_centre, contrast=(positive, negative), over=())
    print(res.to_pandas().pivot(index="site", columns="alpha", values="value").round(2).to_string())

    args.out.mkdir(parents=True, exist_ok=True)
    fig = plot_curve(res, title="steering shapes-vae to the right: Δ x centre (px) vs alpha")
    fig.savefig(args.out / "steering_curve.png", dpi=120)
    write_report({"steering_curve": res}, args.out, title=f"Steering {MODEL} to the right",
                 context={"model": MODEL, "images": len(probe), "seed": args.seed}, pictures=False)
    print(f"wrote {args.out / 'steering_curve.png'}, JSON, CSV and explorer.html in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
