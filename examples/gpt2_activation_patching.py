"""Activation patching on a small GPT-2, end to end.

Clean and corrupted prompts differ in one token. We patch clean activations into the corrupted
run, one site at a time, and read how much of the clean logit difference each site restores:
first for the residual stream at every layer and position, then for every attention head.

The model here is a randomly initialised GPT-2 built from a config (no download), so the
picture shows mechanics, not a learned circuit. Any local checkpoint works the same way:
``GPT2LMHeadModel.from_pretrained("/path/to/checkpoint")``.

    python examples/gpt2_activation_patching.py --out crosspatch-out
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

import crosspatch as cp
from crosspatch.results.report import write_report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("crosspatch-out"), help="folder for plots and results")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    model = GPT2LMHeadModel(GPT2Config(n_layer=4, n_head=4, n_embd=128, vocab_size=200, n_positions=64)).eval()
    m = cp.wrap(model)
    print(m.sites())

    # Eight prompts of 12 tokens; the corrupted ones differ at position 4 only.
    clean = torch.randint(0, 200, (8, 12))
    corrupt = clean.clone()
    corrupt[:, 4] = (clean[:, 4] + 1 + torch.randint(0, 199, (8,))) % 200
    with torch.inference_mode():
        top = m.run(clean).output[:, -1].argmax(-1)
    answer, distractor = top, (top + 1) % 200
    metric = cp.metrics.logit_diff(answer, distractor)

    args.out.mkdir(parents=True, exist_ok=True)
    studies = {
        "resid_pre": "resid_pre.*[pos=*]",
        "heads": "head_out.*[head=*]",
    }
    results = {}
    for name, sites in studies.items():
        result = results[name] = cp.activation_patching(m, clean, corrupt, sites, metric, normalize=True)
        best = result.to_pandas().sort_values("value", ascending=False).head(3)
        print(f"\n{name}: top sites by fraction of the clean-corrupt gap restored\n{best.to_string(index=False)}")
    # PNG, JSON and CSV per result, index.html and the interactive explorer.html.
    write_report(results, args.out, title="Activation patching of a random 4-layer GPT-2",
                 context={"prompts": "8 random token rows, corrupted at position 4", "seed": args.seed})
    print(f"\nwrote plots, results and {args.out.resolve() / 'explorer.html'}")


if __name__ == "__main__":
    main()
