"""What does each vision head of a tiny CLIP write? Heads labelled with words, checked against the truth.

The model is `shapes-clip` from the crosspatch zoo (trained on your CPU on first use, then cached).

1. Each head's direct contribution to the image embedding, exactly (final LayerNorm statistics
   frozen), for images of both splits.
2. A direction per attribute word ("red", "circle", "top", "left", ...): the mean embedding of the
   captions that contain the word minus the mean of all captions (216 captions, every combination).
3. TextSpan (Gandelsman et al. 2024): per head, greedily pick the words whose directions explain
   most of the variance of the head's contributions, projecting each pick out before the next.
4. The images were drawn from known factors, so we can check: eta² says how much of a head's
   variance each factor (shape, colour, x, y, and scale and rotation, which no caption names)
   explains. A head's label is right when its first word belongs to the factor that explains it best.

    python examples/clip_textspan.py --out crosspatch-out/clip_textspan
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from crosspatch.zoo import store as zoo
from crosspatch.adapters.open_clip.zoo import load_wrapped
from crosspatch.adapters.open_clip.zoo import CaptionSet
from crosspatch.methods import cross_modal
from crosspatch.results.report import write_report
from crosspatch.zoo.tasks.shapes import ShapesTask

MODEL = "shapes-clip"
WORD_FACTORS = {"colour": "colour", "shape": "shape", "y": "y", "x": "x"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("crosspatch-out/clip_textspan"))
    parser.add_argument("--n", type=int, default=1000, help="number of images (half train, half test split)")
    parser.add_argument("--k", type=int, default=3, help="words per head")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--library", default="open_clip", choices=["open_clip", "transformers"])
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    if not zoo.cached(MODEL):
        print(f"training {MODEL} on first use: five to seven minutes on a CPU; cached afterwards...")
    m, loaded = load_wrapped(args.library)

    # 1. Per-head direct contributions for images with known factors.
    task = ShapesTask()
    half = args.n // 2
    a = task.sample(half, seed=args.seed, split="train")
    b = task.sample(args.n - half, seed=args.seed, split="test")
    images = torch.cat([a.images, b.images])
    factors = {f: torch.cat([a.factors[f], b.factors[f]]) for f in task.factors}
    dec = cross_modal.decompose_image_embedding(m, images, progress=False)

    # 2. Word directions from the captions of every combination.
    captions = CaptionSet(task).full_captions
    text = cross_modal.encode_texts(m, loaded.tokenizer(captions))
    vocabulary = {word: factor for factor in WORD_FACTORS for word in task.values[factor]}
    words = list(vocabulary)
    directions = cross_modal.word_directions(text, captions, words)

    # 3. TextSpan labels, 4. factors that explain each head.
    about = {"model": m.describe(), "adapter": m.adapter.name, "n_images": args.n}
    spans = cross_modal.textspan(dec.heads, directions, words, k=args.k, metadata=about)
    eta = cross_modal.factor_alignment(dec.heads, factors, metadata=about)
    n_layers, n_heads = spans.values.shape[:2]
    share = dec.head_norms().values / dec.head_norms().values.sum()  # each head's weight in the embedding
    rows, table = [], []
    for l in range(n_layers):
        for h in range(n_heads):
            picked = spans.metadata["words"][l][h]
            best = eta.coords["factor"][int(np.argmax(eta.values[l, h]))]
            right = vocabulary[picked[0]] == best
            rows.append(f"L{l}H{h} {'✓' if right else '✗'}  {', '.join(picked)}")
            table.append({"head": f"L{l}H{h}", "words": picked, "explained": spans.values[l, h].round(3).tolist(),
                          "best_factor": best, "eta2": dict(zip(eta.coords["factor"], eta.values[l, h].round(3).tolist())),
                          "first_word_factor": vocabulary[picked[0]], "agrees": right, "weight": float(share[l, h])})
    agree = [t["agrees"] for t in table]
    nameable = [t for t in table if t["best_factor"] in WORD_FACTORS]
    score = {
        "heads": len(table),
        "agreement": float(np.mean(agree)),
        "agreement_where_a_word_exists": float(np.mean([t["agrees"] for t in nameable])) if nameable else None,
        "agreement_weighted": float(sum(t["weight"] for t in table if t["agrees"])),
    }
    print(f"TextSpan labels agree with the best-explaining factor for {sum(agree)}/{len(agree)} heads "
          f"({score['agreement_weighted']:.0%} of the heads' contribution norm)")
    for row in rows:
        print("  " + row)

    # 5. Plot: eta² per head and factor (0..1), rows labelled with the TextSpan words; a box marks the
    #    factor of each head's first word.
    factors_ = eta.coords["factor"]
    values = eta.values.reshape(n_layers * n_heads, -1)
    figure = Figure(figsize=(9, 1.8 + 0.42 * len(rows)), layout="constrained")
    ax = figure.add_subplot()
    image = ax.imshow(values, cmap="Blues", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    figure.colorbar(image, ax=ax, label="eta² (share of the head's variance)")
    for (r, c), v in np.ndenumerate(values):
        ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=8, color="white" if v > 0.6 else "black")
    for r, t in enumerate(table):
        c = factors_.index(t["first_word_factor"])
        ax.add_patch(Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, edgecolor="tab:orange", linewidth=2.2))
    ax.set_xticks(range(len(factors_)), factors_)
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("known factor of the images (scale and rotation are in no caption)")
    ax.set_ylabel("head: TextSpan words (✓ = the first word names the best factor)")
    ax.set_title(f"{MODEL} vision heads ({args.library}): how much each known factor explains a head (eta²),\n"
                 f"and the words TextSpan found for it (orange box: the factor of the first word)\n"
                 f"agreement {sum(agree)}/{len(agree)} heads, {score['agreement_weighted']:.0%} by contribution norm",
                 fontsize=10)
    figure.savefig(args.out / "textspan.png", dpi=130)
    write_report({"textspan": spans, "factor_alignment": eta}, args.out, title=f"{MODEL}: TextSpan of the heads",
                 context={"model": MODEL}, pictures=False)
    (args.out / "summary.json").write_text(json.dumps({**score, "heads_table": table,
                                                       "seconds": round(time.perf_counter() - start, 1)}, indent=2))
    print(f"wrote {args.out}/textspan.png and JSON results in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
