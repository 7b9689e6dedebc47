"""Where does a tiny CLIP see colour? Minimal-pair activation patching in the vision tower.

The model is `shapes-clip` from the crosspatch zoo: a small open_clip CLIP trained on captioned
shapes on your CPU the first time you run this (a few minutes, then cached).

Each pair is two images of the held-out test split that differ only in colour ("a blue circle at
the top left" vs "a magenta circle at the top left"). Every image is scored against both captions;
the metric is logit(image, clean caption) - logit(image, corrupt caption). We run the corrupt image
and patch in one activation of the clean image at a time (denoising): 1 means that site alone
brings back the whole clean-corrupt gap.

  * per layer: the residual stream entering each block (all tokens, only the class token, only the
    patch tokens) and what attention and the MLP write;
  * per head: each attention head's write into the residual stream.

With --library transformers the same study runs on a HuggingFace CLIPModel holding a copy of the
weights (crosspatch.adapters.open_clip.to_transformers); the numbers agree.

    python examples/clip_vision_patching.py --out crosspatch-out/clip_vision
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

import crosspatch as cp
from crosspatch.zoo import store as zoo
from crosspatch.adapters.open_clip.zoo import load_wrapped
from crosspatch.methods import cross_modal
from crosspatch.results.report import write_report
from crosspatch.zoo.tasks.shapes import ShapesTask

MODEL = "shapes-clip"


def load(library: str):
    if not zoo.cached(MODEL):
        print(f"training {MODEL} on first use: five to seven minutes on a CPU; cached afterwards...")
    return load_wrapped(library)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("crosspatch-out/clip_vision"), help="folder for plots and results")
    parser.add_argument("--n", type=int, default=96, help="number of image pairs (test split)")
    parser.add_argument("--factor", default="colour", choices=["colour", "shape"], help="what the two images differ in")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--library", default="open_clip", choices=["open_clip", "transformers"])
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    # 1. The model and its tokenizer (open_clip's bundled BPE tokenizer).
    m, loaded = load(args.library)
    tok = loaded.tokenizer
    print(f"{MODEL} ({args.library}) ready after {time.perf_counter() - start:.1f} s; "
          f"zero-shot accuracy on held-out combinations {loaded.info['accuracy']:.3f}")

    # 2. Image pairs that differ in one factor, from the held-out combinations, and their captions.
    pairs = ShapesTask().pairs(args.n, seed=args.seed, split="test", factor=args.factor)
    clean, corrupt = pairs.clean, pairs.corrupt
    texts = tok(clean.captions), tok(corrupt.captions)
    print(f"{len(pairs)} pairs, e.g. {clean.captions[0]!r} vs {corrupt.captions[0]!r}")

    def patch(sites):
        return cross_modal.image_pair_patching(m, clean.images, corrupt.images, *texts, sites, progress=False)

    # 3. Per layer: the residual stream (all tokens / class token / patch tokens), attention and MLP writes.
    n_tokens = m.catalog.family("vision.resid_pre").axis("pos").size
    rows = {
        "resid_pre (all tokens)": "vision.resid_pre.*",
        "resid_pre (class token)": "vision.resid_pre.*[pos=0]",
        f"resid_pre (patches 1-{n_tokens - 1})": f"vision.resid_pre.*[pos=1:{n_tokens}]",
        "attn_out": "vision.attn_out.*",
        "mlp_out": "vision.mlp_out.*",
    }
    per_layer = [patch(sites) for sites in rows.values()]
    layers = cp.Result(
        np.stack([r.values for r in per_layer]), ("site", "layer"), {"site": list(rows)},
        {**per_layer[0].metadata, "sites": list(rows.values())},
    )
    heads = patch("vision.head_out.*[head=*]")
    base = heads.metadata["baseline"]
    print(f"logit diff: clean {base['clean']:.2f}, corrupt {base['corrupt']:.2f} (mean over pairs)")

    # 4. Plots and results.
    figure = Figure(figsize=(12.5, 4.6), layout="constrained")
    left, right = figure.subplots(1, 2, width_ratios=[1.35, 1])
    short(layers).plot(ax=left, title="per layer")
    short(heads).plot(ax=right, title="per head (vision.head_out)")
    figure.suptitle(
        f"{MODEL} vision tower: {len(pairs)} held-out image pairs differing in {args.factor}, patched clean → corrupt\n"
        f"(1 = the site restores the clean image's preference for its own caption; {args.library})"
    )
    figure.savefig(args.out / "vision_patching.png", dpi=130)
    write_report({"vision_layers": layers, "vision_heads": heads}, args.out,
                 title=f"{MODEL} vision tower: activation patching", context={"model": MODEL}, pictures=False)
    top = heads.to_pandas().sort_values("value", ascending=False).head(3)
    summary = {
        "pairs": len(pairs), "factor": args.factor, "library": args.library, "baseline": base,
        "top_heads": top.to_dict("records"),
        "class_token_by_layer": layers.sel(site="resid_pre (class token)").values.tolist(),
        "seconds": round(time.perf_counter() - start, 1),
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\nheads restoring most of the gap:\n{top.to_string(index=False)}")
    print(f"\nwrote {args.out}/vision_patching.png and JSON results in {time.perf_counter() - start:.1f} s")


def short(result: cp.Result) -> cp.Result:
    """The same result with a short colour-bar label (the full metric stays in the saved metadata)."""
    return cp.Result(result.values, result.dims, result.coords, {**result.metadata, "metric": "logit diff"})


if __name__ == "__main__":
    main()
