"""Cross-modal information flow in a tiny LLaVA: attention knockout between image, question and last token, and
image-token patching between images that differ in colour or in shape.

The model is `shapes-vlm` from the crosspatch zoo: a LLaVA (CLIP vision tower, projector, 8-layer Llama) trained on
your CPU the first time you run this (a few minutes, then cached) to answer "what colour is the shape ?",
"what shape is it ?" and "is it on the left ?" about shapes images with one word.

1. Knockout (Zhang, Yadav, Han, Shutova, CVPR 2025): for each question, on held-out images the model answers
   right, block the attention edges image -> question, image -> last and question -> last in a window of layers
   around each layer and read the % change of the right answer's probability (bootstrap 95 % intervals).
2. Image-token patching: pairs of held-out images that differ only in colour (asked the colour question) or only
   in shape (asked the shape question); the corrupt image's run gets one clean activation at a time over the
   language model's layers: the residual at the image tokens, at the question tokens, at the last token, and
   what attention and the MLP write at the last token. 1 means that site alone restores the clean answer.

    python examples/vlm_flow.py --out crosspatch-out/vlm_flow
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
from crosspatch.adapters.vlm import VLMAdapter
from crosspatch.adapters.vlm.shapes_study import flow_by_question, image_pair_patching
from crosspatch.results.report import write_report

MODEL = "shapes-vlm"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("crosspatch-out/vlm_flow"), help="folder for plots and results")
    parser.add_argument("--n", type=int, default=96, help="images per question, and image pairs per factor")
    parser.add_argument("--window", type=int, default=3,
                        help="layers blocked around each layer (the paper: 9 of 32-40 layers; here 3 of 8)")
    parser.add_argument("--split", default="test", choices=["test", "train"],
                        help="test: shape-colour combinations never seen in training; train: the ones it trained on")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    # 1. The model (trained on first use) and its word-level tokenizer.
    if not zoo.cached(MODEL):
        print(f"training {MODEL} on first use: about five minutes on a CPU; cached afterwards...")
    loaded = zoo.load(MODEL)
    m = cp.wrap(loaded.model, VLMAdapter())
    info = loaded.info
    accuracy = {k: round(v, 3) for k, v in info.items() if "accuracy_" in k and isinstance(v, float)}
    print(f"{MODEL} ready after {time.perf_counter() - start:.1f} s; held-out accuracy per question {accuracy}")

    # 2. Knockout per question, windows of args.window layers, and single layers.
    flows = {w: flow_by_question(m, loaded.tokenizer, args.n, window=w, split=args.split, seed=args.seed)
             for w in (args.window, 1)}
    main_flows = flows[args.window]
    for q, flow in main_flows.items():
        print(f"\n{q}: {flow.metadata['n_items']} items answered right; mean % change of the answer probability")
        for e, name in enumerate(flow.edges):
            print(f"  {name:18s} " + " ".join(f"{v:7.1f}" for v in flow.change[e]))
    figure = Figure(figsize=(13, 7), layout="constrained")
    axes = figure.subplots(2, len(main_flows), sharey="row")
    for row, w in enumerate(flows):
        for ax, (q, flow) in zip(axes[row], flows[w].items()):
            flow.plot(ax=ax)
            ax.set_title(f"{flow.metadata['question']!r} ({flow.metadata['n_items']} items)", fontsize=10)
            ax.set_xlabel(f"layer (centre of a {w}-layer window)" if w > 1 else "layer (one layer blocked)")
            if ax is not axes[row][0]:
                ax.set_ylabel("")
                ax.get_legend().remove()
    figure.suptitle(f"{MODEL}: attention knockout on {args.split}-split images, % change of the right answer's probability "
                    f"(mean, 95 % bootstrap interval)")
    figure.savefig(args.out / "flow.png", dpi=120)

    # 3. Image-token patching between images that differ in one factor.
    patching = {f: image_pair_patching(m, loaded.tokenizer, f, args.n, split=args.split, seed=args.seed)
                for f in ("colour", "shape")}
    figure = Figure(figsize=(13, 4), layout="constrained")
    for ax, (factor, result) in zip(figure.subplots(1, 2), patching.items()):
        meta = result.metadata
        shown = cp.Result(np.round(result.values, 2), result.dims, result.coords, {**meta, "metric": "restored", "normalize": False})
        shown.plot(ax=ax, annotate=True)
        ax.set_title(f"{factor} pairs, {meta['question']!r} ({meta['pairs']} pairs)", fontsize=10)
        ax.set_xlabel("language-model layer")
    figure.suptitle(f"{MODEL}: patching the clean image's activations into the corrupt image's run "
                    "(1 = the clean answer restored)")
    figure.savefig(args.out / "patching.png", dpi=120)
    for factor, result in patching.items():
        print(f"\n{factor} pairs: normalised effect per layer")
        for s, label in enumerate(result.coords["site"]):
            print(f"  {label:26s} " + " ".join(f"{v:6.2f}" for v in result.values[s]))

    # 4. The report: every result as JSON/CSV, index.html and explorer.html.
    results = {f"flow_{q}_window{w}": flow.to_result().sel(stat="mean") for w in flows for q, flow in flows[w].items()}
    results.update({f"patching_{f}": r for f, r in patching.items()})
    context = {"model": MODEL, "held-out accuracy": accuracy, "items per question": args.n, "window": args.window,
               "split": args.split, "seed": args.seed, "train_seconds": info.get("train_seconds")}
    write_report(results, args.out, title=f"{MODEL}: cross-modal information flow", context=context, pictures=False)
    summary = {
        "accuracy": accuracy, "window": args.window,
        "flow": {w: {q: {"edges": f.edges, "change": f.change.round(2).tolist(), "ci_low": f.ci_low.round(2).tolist(),
                         "ci_high": f.ci_high.round(2).tolist(), "items": f.metadata["n_items"]}
                     for q, f in fl.items()} for w, fl in flows.items()},
        "patching": {f: {"sites": r.coords["site"], "values": np.round(r.values, 3).tolist(),
                         "baseline": r.metadata["baseline"]} for f, r in patching.items()},
        "seconds": round(time.perf_counter() - start, 1),
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\nwrote {args.out}/flow.png, patching.png, explorer.html and JSON results in {summary['seconds']} s")


if __name__ == "__main__":
    main()
