"""Which latents of a shapes VAE carry which generative factor, and what does β change? Latent interventions, end to end.

The models are `shapes-vae` (β = 4) and `shapes-vae-beta1` (β = 1) from the crosspatch zoo: small
convolutional VAEs with 8 latents, trained on 32x32 images of one coloured shape drawn from six
known factors (shape, colour, scale, x, y, rotation). They train on your CPU the first time you run
this (a few minutes each), then load from the cache (CROSSPATCH_CACHE moves it).

For each model:

  * factor mediation: image pairs that differ in exactly one factor; interchange one latent from
    the second image into the first image's run and measure which share of the factor's change in
    the reconstruction that latent alone reproduces (1 = all of it). That ranks the latents per
    factor (a factor x latent matrix), and the same for the channels of the last encoder block;
  * latent traversals: one image decoded with each latent set to -2.5 ... 2.5 (do(z_i = v)), as an
    image grid, rows sorted by how strongly each latent acts on the output;
  * causal effect strength, intervention specificity and circuit modularity of the latents.

Then β = 1 and β = 4 side by side. PNG + JSON go to --out.

    python examples/vae_study.py --out crosspatch-out/vae
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import crosspatch as cp
from crosspatch.results.report import write_report
from crosspatch.zoo import store as zoo
from crosspatch.methods.latent import decoder_inputs, traversal_figure, traversal_grid
from crosspatch.methods.vae_metrics import factor_mediation, latent_metrics
from crosspatch.zoo.tasks import ShapesTask

MODELS = {"beta4": ("shapes-vae", "β = 4"), "beta1": ("shapes-vae-beta1", "β = 1")}
TRAVERSAL = tuple(np.round(np.linspace(-2.5, 2.5, 7), 2).tolist())
ENCODER_SITE = "encoder.block.2"  # the last encoder block: 32 channels on a 4x4 grid


def study(name: str, label: str, task: ShapesTask, args) -> dict:
    if not zoo.cached(name, seed=args.seed):
        print(f"training {name} on first use: two to three minutes on a CPU; cached afterwards...")
    loaded = zoo.load(name, seed=args.seed, progress=args.progress)
    m = cp.wrap(loaded.model)
    kl = loaded.info["kl_per_latent"]
    print(f"\n{name} ({label}): {loaded.info['active_latents']} active latents (KL > 0.1 nats), "
          f"reconstruction MSE {loaded.info['recon_mse_train']:.4f} (train split) / "
          f"{loaded.info['recon_mse_test']:.4f} (held-out shape-colour pairs)")

    # 1. Which latents carry which factor: interchange one latent between images differing in one factor.
    mediation = factor_mediation(m, task, "latent.z", n=args.pairs, seed=args.seed, split="train", progress=args.progress)
    channels = factor_mediation(m, task, ENCODER_SITE, n=args.pairs, seed=args.seed, split="train", progress=args.progress)

    # 2. Effect strength, specificity, modularity: set each latent over a grid, on decode-only runs.
    images = task.sample(args.images, seed=args.seed + 1, split="train").images
    metrics = latent_metrics(m, decoder_inputs(m, images), "latent.z", over="pixels", progress=args.progress)
    strength = metrics["effect_strength"].values
    specificity = metrics["specificity"].values
    modularity = float(metrics["modularity"].values)

    ranking = {}
    for i, factor in enumerate(mediation.coords["factor"]):
        order = np.argsort(-mediation.values[i])
        ranking[factor] = [{"latent": int(j), "share": round(float(mediation.values[i, j]), 3)} for j in order]
    top = {factor: ranks[0] for factor, ranks in ranking.items()}
    print("  latents carrying each factor (share of the factor's output change):")
    for factor, ranks in ranking.items():
        print(f"    {factor:9s} " + ", ".join(f"z{r['latent']} {r['share']:.2f}" for r in ranks[:3]))
    print(f"  circuit modularity {modularity:.3f}; effect strength per latent "
          + " ".join(f"z{i}:{s:.3f}" for i, s in enumerate(strength)))

    # 3. Traversals of one image, latents ordered by effect strength.
    # a training-split image (cyan and yellow squares are held-out combinations the model never saw)
    reference = task.batch(task.encode(shape="square", colour="magenta", scale="large", x="center", y="middle", rotation=15))
    assert task.split_of(reference.factors) == ["train"]
    grid = traversal_grid(m, reference.images, "latent.z", TRAVERSAL, progress=args.progress)[:, :, 0]
    order = np.argsort(-strength)
    rows = []
    for i in order:
        shares = mediation.values[:, i]
        f1, f2 = np.argsort(-shares)[:2]
        names = mediation.coords["factor"]
        if kl[i] < 0.1:
            rows.append(f"z{i}: switched off\nKL {kl[i]:.2f}")
        else:
            rows.append(f"z{i}: {names[f1]} {shares[f1]:.2f},\n{names[f2]} {shares[f2]:.2f}; KL {kl[i]:.1f}")
    original = [("input", reference.images[0]), ("reconstruction", m.run(reference.images).output[0])]
    return {
        "name": name, "label": label, "model": m, "info": loaded.info, "mediation": mediation, "channels": channels,
        "metrics": metrics, "strength": strength, "specificity": specificity, "modularity": modularity,
        "ranking": ranking, "top": top, "grid": grid[order], "rows": rows, "original": original,
        "caption": reference.captions[0],
    }


def save_model_outputs(tag: str, s: dict, out: Path) -> list[Path]:
    written = []
    title = f"{s['name']} ({s['label']}): share of each factor's output change carried by each latent"
    fig = s["mediation"].plot(title=title, annotate=False)
    _label_cells(fig.axes[0], s["mediation"])
    written += [_save(fig, out / f"mediation_{tag}.png"), s["mediation"].save(out / f"mediation_{tag}")]
    fig = s["channels"].plot(title=f"{s['name']} ({s['label']}): share carried by each channel of {ENCODER_SITE}")
    written += [_save(fig, out / f"encoder_channels_{tag}.png"), s["channels"].save(out / f"encoder_channels_{tag}")]
    for key in ("effect_strength", "specificity"):
        written.append(s["metrics"][key].save(out / f"{key}_{tag}"))
    written.append(s["metrics"]["modularity"].save(out / f"modularity_{tag}"))
    fig = traversal_figure(
        s["grid"], row_labels=s["rows"], col_labels=[f"v = {v:g}" for v in TRAVERSAL], header=s["original"],
        title=f"{s['name']} ({s['label']}): do(z_i = v) on one image (\"{s['caption']}\", rotated 15°)\n"
              f"rows: latents, strongest effect first; label: the two factors it carries most (share) and its KL",
    )
    written.append(_save(fig, out / f"traversals_{tag}.png"))
    return written


def comparison(studies: dict, out: Path) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(14, 9.5), layout="constrained")
    axes = fig.subplots(2, 2)
    limit = max(float(np.abs(s["mediation"].values).max()) for s in studies.values())
    for ax, s in zip(axes[0], studies.values()):
        res = s["mediation"]
        res.plot(ax=ax, title=f"{s['name']} ({s['label']}): factor × latent share", annotate=False)
        for image in ax.images:
            image.set_clim(-limit, limit)  # one colour scale for both panels
        _label_cells(ax, res, limit)
    ax = axes[1, 0]
    width = 0.38
    for k, s in enumerate(studies.values()):
        x = np.arange(len(s["strength"])) + (k - 0.5) * width
        ax.bar(x, s["strength"], width, label=s["label"])
    ax.set_xticks(range(len(next(iter(studies.values()))["strength"])),
                  [f"z{i}" for i in range(len(next(iter(studies.values()))["strength"]))])
    ax.set_ylabel("mean |Δ pixel| over do(z_i = -3 ... 3)")
    ax.set_title("causal effect strength per latent")
    ax.legend()
    ax = axes[1, 1]
    scores = {
        "circuit modularity\n1 - mean |corr| of effect maps": [s["modularity"] for s in studies.values()],
        "intervention specificity\nmean over active latents": [_active_mean(s) for s in studies.values()],
        "factor concentration\ntop latent's share / Σ |shares|": [_concentration(s["mediation"].values) for s in studies.values()],
        "active latents\nKL > 0.1 nats, of 8": [s["info"]["active_latents"] / 8 for s in studies.values()],
    }
    y = np.arange(len(scores))[::-1]
    for k, s in enumerate(studies.values()):
        vals = [v[k] for v in scores.values()]
        bars = ax.barh(y - (k - 0.5) * width, vals, width, label=s["label"])
        ax.bar_label(bars, fmt="%.2f", fontsize=8, padding=2)
    ax.set_yticks(y, list(scores), fontsize=9)
    ax.set_xlim(0, 1.05)
    ax.set_xlabel("score (higher = more disentangled, except active latents)")
    ax.set_title("summary scores")
    ax.legend(loc="lower right")
    fig.suptitle("shapes VAEs: β = 1 vs β = 4", fontsize=13)
    return _save(fig, out / "beta_comparison.png")


def _label_cells(ax, res: cp.Result, limit: float | None = None) -> None:
    """Latent tick labels z0, z1 ... and each cell's share with two decimals (blank when below 0.005)."""
    ax.set_xticks(range(len(res.coords[res.dims[1]])), [f"z{i}" for i in res.coords[res.dims[1]]])
    limit = limit or float(np.abs(res.values).max()) or 1.0
    for (r, c), v in np.ndenumerate(res.values):
        if abs(v) >= 0.005:
            ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=8,
                    color="white" if abs(v) > 0.6 * limit else "black")


def _active_mean(s: dict) -> float:
    active = np.array(s["info"]["kl_per_latent"]) > 0.1
    values = s["specificity"][active]
    return float(np.nanmean(values)) if values.size else float("nan")


def _concentration(shares: np.ndarray) -> float:
    """Per factor, the top latent's share over the sum of |shares|, averaged: 1 = one latent per factor."""
    mags = np.abs(shares)
    return float(np.mean(mags.max(axis=1) / np.maximum(mags.sum(axis=1), 1e-12)))


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("crosspatch-out/vae"), help="folder for PNG and JSON")
    parser.add_argument("--pairs", type=int, default=32, help="image pairs per factor for mediation")
    parser.add_argument("--images", type=int, default=64, help="images for the effect metrics")
    parser.add_argument("--seed", type=int, default=0, help="seed of the zoo models and of the image draws")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=False, help="progress bars")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    task = ShapesTask()

    studies = {tag: study(name, label, task, args) for tag, (name, label) in MODELS.items()}
    written = []
    for tag, s in studies.items():
        written += save_model_outputs(tag, s, args.out)
    written.append(comparison(studies, args.out))
    summary = {
        tag: {
            "model": s["name"], "beta": s["info"]["beta"], "active_latents": s["info"]["active_latents"],
            "kl_per_latent": s["info"]["kl_per_latent"], "recon_mse_train": s["info"]["recon_mse_train"],
            "recon_mse_test": s["info"]["recon_mse_test"], "circuit_modularity": s["modularity"],
            "effect_strength": [round(float(v), 5) for v in s["strength"]],
            "specificity": [None if np.isnan(v) else round(float(v), 4) for v in s["specificity"]],
            "factor_concentration": _concentration(s["mediation"].values),
            "top_latent_per_factor": s["top"], "ranking": s["ranking"],
        }
        for tag, s in studies.items()
    }
    path = args.out / "summary.json"
    path.write_text(json.dumps(summary, indent=2), encoding="utf-8")
    written.append(path)
    # Every result of both models in one report: index.html and the interactive explorer.html.
    results = {}
    for tag, s in studies.items():
        results.update({f"mediation_{tag}": s["mediation"], f"encoder_channels_{tag}": s["channels"]})
        results.update({f"{key}_{tag}": s["metrics"][key] for key in ("effect_strength", "specificity", "modularity")})
    write_report(results, args.out, title="Shapes VAEs: which latent carries which factor",
                 context={"models": ", ".join(s["name"] for s in studies.values()), "seed": args.seed}, pictures=False)
    written += [args.out / "index.html", args.out / "explorer.html"]
    print(f"\nwrote {len(written)} files to {args.out} in {time.perf_counter() - start:.1f} s:")
    for p in written:
        print(f"  {p.name}")


if __name__ == "__main__":
    main()
