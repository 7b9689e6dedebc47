"""Which layers and heads write the image embedding of a tiny CLIP? Exact direct contributions.

The model is `shapes-clip` from the crosspatch zoo (trained on your CPU on first use, then cached).

The image embedding is read off the class token of the last residual stream, which is the sum of
the embeddings and of what every attention layer (every head, plus its output bias) and every MLP
wrote. With the final LayerNorm's statistics frozen, the readout is linear, so the embedding is the
exact sum of each part's *direct contribution* (checked below to float rounding).

  * Direct logit attribution: for each image, how much each part pushes its own caption above the
    captions that differ only in the colour (or shape, or position) word, in logits.
  * Mean-ablation curves: zero-shot accuracy when a layer's attention or MLP is replaced by its mean
    over the images, directly (only its own contribution to the embedding), for all layers up to l
    together, or in total (through the forward pass, so later layers see the change too).

    python examples/clip_decomposition.py --out crosspatch-out/clip_decomposition
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

import crosspatch as cp
from crosspatch.zoo import store as zoo
from crosspatch.adapters.open_clip.zoo import load_wrapped
from crosspatch.adapters.open_clip.zoo import CaptionSet
from crosspatch.methods import cross_modal
from crosspatch.results.report import write_report
from crosspatch.zoo.tasks.shapes import ShapesTask

MODEL = "shapes-clip"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("crosspatch-out/clip_decomposition"))
    parser.add_argument("--n", type=int, default=500, help="number of test images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--library", default="open_clip", choices=["open_clip", "transformers"])
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    if not zoo.cached(MODEL):
        print(f"training {MODEL} on first use: five to seven minutes on a CPU; cached afterwards...")
    m, loaded = load_wrapped(args.library)

    # 1. Images of held-out combinations; every caption of every combination.
    task = ShapesTask()
    batch = task.sample(args.n, seed=args.seed, split="test")
    captions = CaptionSet(task)
    ids = loaded.tokenizer(captions.full_captions)
    labels = captions.full_index(batch.factors)

    # 2. The decomposition, and its check.
    dec = cross_modal.decompose_image_embedding(m, batch.images, progress=False)
    print(f"decomposed {args.n} image embeddings: max |sum of contributions - embedding| = {dec.error():.1e}, "
          f"heads vs their layer {dec.head_error():.1e}")

    # 3. Direct logit attribution against the captions that differ in one attribute.
    text = F.normalize(cross_modal.encode_texts(m, ids).double(), dim=-1)
    scale = float(m.module.logit_scale.detach().exp())  # open_clip and HuggingFace CLIP both name it so
    f = batch.factors
    alternatives = {
        "colour": [{**f, "colour": torch.full_like(labels, c)} for c in range(len(task.colours))],
        "shape": [{**f, "shape": torch.full_like(labels, s)} for s in range(len(task.shapes))],
        "position": [{**f, "y": torch.full_like(labels, y), "x": torch.full_like(labels, x)}
                     for y in range(3) for x in range(3)],
    }
    per_component, per_head = [], {}
    for name, alts in alternatives.items():
        others = torch.stack([captions.full_index(a) for a in alts], dim=1)  # [n, k], includes the right one
        wrong = text[others].sum(dim=1) - text[labels]
        direction = scale * (text[labels] - wrong / (others.shape[1] - 1))  # right caption minus the mean wrong one
        layers, heads, constant = dec.along(direction)
        full = dec.embedding.double() @ direction.T  # sanity: the parts add up to the logit difference
        full = full.diagonal() / dec.embedding.double().norm(dim=-1)
        assert torch.allclose(layers.sum(1) + constant, full, atol=1e-4)
        per_component.append(layers.mean(dim=0).cpu().numpy())
        per_head[name] = cp.Result(heads.mean(dim=0).cpu(), ("layer", "head"), {},
                                   {"metric": f"{name}: logit diff, direct", "method": "direct logit attribution"})
    attribution = cp.Result(np.stack(per_component), ("attribute", "component"),
                            {"attribute": list(alternatives), "component": dec.components},
                            {**dec.metadata, "metric": "direct logit diff (right − mean wrong caption)"})

    # 4. Mean-ablation curves by layer.
    curves = cross_modal.mean_ablation_curves(m, batch.images, ids, labels, decomposition=dec, progress=False)

    # 5. Plots and results.
    figure = Figure(figsize=(15, 4.4), layout="constrained")
    axes = figure.subplots(1, 4, width_ratios=[2.1, 1, 1, 1])
    heatmap(figure, axes[0], attribution, "per component", float(np.abs(attribution.values).max()))
    limit = max(float(np.abs(r.values).max()) for r in per_head.values())  # one scale for the three head maps
    for ax, (name, res) in zip(axes[1:], per_head.items()):
        heatmap(figure, ax, res, f"per head: {name}", limit, colorbar=name == "position")
    figure.suptitle(f"{MODEL}: direct contributions to the logit of the right caption over the captions that "
                    f"differ in one attribute ({args.n} held-out images, {args.library})")
    figure.savefig(args.out / "direct_logit_attribution.png", dpi=130)

    plot_curves(curves, args.out / "mean_ablation.png")
    # JSON and CSV per result, index.html and the interactive explorer.html (the PNGs above are the pictures).
    write_report({"direct_logit_attribution": attribution, **{f"heads_{k}": r for k, r in per_head.items()},
                  "mean_ablation": curves}, args.out, title=f"{MODEL}: direct logit attribution",
                 context={"model": MODEL, "images": args.n, "library": args.library}, pictures=False)
    summary = {
        "images": args.n, "library": args.library, "decomposition_error": dec.error(),
        "head_error": dec.head_error(), "zero_shot_accuracy": curves.metadata["baseline"],
        "seconds": round(time.perf_counter() - start, 1),
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"zero-shot accuracy among all 216 captions: {summary['zero_shot_accuracy']:.3f}; direct logit "
          f"attribution (right caption over the ones differing in one attribute), per component:")
    print(attribution.to_pandas().pivot(index="attribute", columns="component", values="value")
          [dec.components].round(2).to_string())
    print(f"wrote {args.out}/direct_logit_attribution.png, {args.out}/mean_ablation.png and JSON results "
          f"in {time.perf_counter() - start:.1f} s")


def plot_curves(curves: cp.Result, path: Path) -> None:
    figure = Figure(figsize=(8.5, 4.2), layout="constrained")
    ax = figure.add_subplot()
    layers = curves.coords["layer"]
    styles = {"direct": "-o", "direct ≤ l": "--s", "total": ":^"}
    colours = {"attn": "tab:blue", "mlp": "tab:orange"}
    for name, values in zip(curves.coords["ablation"], curves.values):
        part, kind = name.split(" ", 1)
        ax.plot(layers, values, styles[kind], color=colours[part], label=name, markersize=5)
    ax.axhline(curves.metadata["baseline"], color="0.3", linewidth=1, label="no ablation")
    ax.axhline(curves.metadata["chance"], color="0.6", linewidth=1, linestyle="-.", label="chance")
    ax.set_xticks(layers)
    ax.set_xlabel("layer")
    ax.set_ylabel("zero-shot accuracy (216 captions)")
    ax.set_ylim(0, 1.02)
    ax.set_title("mean ablation of attention / MLP layers")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    figure.savefig(path, dpi=130)


def heatmap(figure: Figure, ax, result: cp.Result, title: str, limit: float, colorbar: bool = True) -> None:
    """A diverging heatmap centred on 0 with a given limit, cells annotated with two decimals."""
    image = ax.imshow(result.values, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto", interpolation="nearest")
    if colorbar:
        figure.colorbar(image, ax=ax, label="logit diff (direct)")
    for (r, c), v in np.ndenumerate(result.values):
        ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=8,
                color="white" if abs(v) > 0.6 * limit else "black")
    (rows, cols) = result.dims
    ax.set_xticks(range(len(result.coords[cols])), [str(x) for x in result.coords[cols]],
                  rotation=45 if cols == "component" else 0)
    ax.set_yticks(range(len(result.coords[rows])), [str(x) for x in result.coords[rows]])
    ax.set_xlabel(cols)
    ax.set_ylabel(rows)
    ax.set_title(title)


if __name__ == "__main__":
    main()
