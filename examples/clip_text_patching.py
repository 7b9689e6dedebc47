"""Where does a tiny CLIP read the colour word? Minimal-pair activation patching in the text tower.

The model is `shapes-clip` from the crosspatch zoo (trained on your CPU on first use, then cached).

Each pair is two captions that differ in one word ("a blue circle at the top left" vs "a magenta
circle at the top left"), each describing its own image of the held-out test split. The captions
are the rows of the run and both images are the candidates; the metric is each caption's
logit(caption, clean image) - logit(caption, corrupt image). We run the corrupt caption and patch
in one activation of the clean caption at a time: 1 means that site alone restores the whole gap.

  * per layer and token position: the residual stream entering each block;
  * per layer: what attention and the MLP write (all positions);
  * per head: each attention head's write.

Patching needs the two captions to line up token by token, so pairs whose words tokenize to
different lengths ("cyan" is two BPE tokens, "cy" + "an") are left out.

    python examples/clip_text_patching.py --out crosspatch-out/clip_text
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from matplotlib.figure import Figure

import crosspatch as cp
from crosspatch.zoo import store as zoo
from crosspatch.adapters.open_clip.zoo import load_wrapped
from crosspatch.methods import cross_modal
from crosspatch.results.report import write_report
from crosspatch.zoo.tasks.shapes import ShapesTask

MODEL = "shapes-clip"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("crosspatch-out/clip_text"), help="folder for plots and results")
    parser.add_argument("--n", type=int, default=96, help="number of caption pairs (test split)")
    parser.add_argument("--factor", default="colour", choices=["colour", "shape", "x", "y"], help="the word that differs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--library", default="open_clip", choices=["open_clip", "transformers"])
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    # 1. The model and its tokenizer.
    if not zoo.cached(MODEL):
        print(f"training {MODEL} on first use: five to seven minutes on a CPU; cached afterwards...")
    m, loaded = load_wrapped(args.library)
    tok = loaded.tokenizer

    # 2. Pairs differing in one factor; keep those whose captions differ in exactly one token.
    pairs = ShapesTask().pairs(3 * args.n, seed=args.seed, split="test", factor=args.factor)
    clean_ids, corrupt_ids = tok(pairs.clean.captions), tok(pairs.corrupt.captions)
    aligned = ((clean_ids != corrupt_ids).sum(dim=1) == 1).nonzero().squeeze(1)[: args.n]
    keep = aligned.tolist()
    clean_ids, corrupt_ids = clean_ids[aligned], corrupt_ids[aligned]
    clean_images, corrupt_images = pairs.clean.images[aligned], pairs.corrupt.images[aligned]
    print(f"{len(keep)} aligned caption pairs, e.g. {pairs.clean.captions[keep[0]]!r} vs "
          f"{pairs.corrupt.captions[keep[0]]!r}")

    def patch(sites):
        return cross_modal.text_pair_patching(m, clean_ids, corrupt_ids, clean_images, corrupt_images, sites,
                                              progress=False)

    # 3. Per layer x position (up to the end token: later positions cannot reach it), and per head.
    end = int(clean_ids[0].argmax())  # open_clip pools the caption at its end token, the highest id
    words = [tok.decoder[int(t)].replace("</w>", "") for t in clean_ids[0, : end + 1]]
    words[0], words[-1] = "<start>", "<end>"
    if all(int(row.argmax()) == end for row in clean_ids):  # every caption has the same token roles
        differs = int((clean_ids[0] != corrupt_ids[0]).nonzero())
        words = [f"{i} {w}" + (" *" if i == differs else "") for i, w in enumerate(words)]
    positions = patch("text.resid_pre.*[pos=*]")
    positions = cp.Result(positions.values[:, : end + 1], ("layer", "pos"), {"pos": words}, positions.metadata)
    writes = patch(["text.attn_out.*", "text.mlp_out.*"])
    n_layers = positions.values.shape[0]
    writes = cp.Result(writes.values.reshape(2, n_layers), ("site", "layer"), {"site": ["attn_out", "mlp_out"]},
                       writes.metadata)
    heads = patch("text.head_out.*[head=*]")
    base = heads.metadata["baseline"]
    print(f"logit diff: clean {base['clean']:.2f}, corrupt {base['corrupt']:.2f} (mean over pairs)")

    # 4. Plots and results (a short colour-bar label: the full metric is in each result's metadata).
    figure = Figure(figsize=(15, 5.3), layout="constrained")
    a, b, c = figure.subplots(1, 3, width_ratios=[2.2, 1, 1.1])
    short(positions).plot(ax=a, title="text.resid_pre, per token (* = the differing word)")
    short(writes).plot(ax=b, title="attention / MLP writes")
    short(heads).plot(ax=c, title="per head (text.head_out)")
    figure.suptitle(
        f"{MODEL} text tower: {len(keep)} caption pairs differing in the {args.factor} word, patched clean → corrupt\n"
        f"(1 = the site restores the clean caption's preference for its image; {args.library})"
    )
    figure.savefig(args.out / "text_patching.png", dpi=130)
    write_report({"text_positions": positions, "text_writes": writes, "text_heads": heads}, args.out,
                 title=f"{MODEL} text tower: patching the {args.factor} word",
                 context={"model": MODEL, "pairs": len(keep), "library": args.library}, pictures=False)
    summary = {
        "pairs": len(keep), "factor": args.factor, "library": args.library, "baseline": base,
        "positions": words, "top_heads": heads.to_pandas().sort_values("value", ascending=False).head(3).to_dict("records"),
        "seconds": round(time.perf_counter() - start, 1),
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"wrote {args.out}/text_patching.png and JSON results in {time.perf_counter() - start:.1f} s")


def short(result: cp.Result) -> cp.Result:
    return cp.Result(result.values, result.dims, result.coords, {**result.metadata, "metric": "logit diff"})


if __name__ == "__main__":
    main()
