"""Where does a tiny GPT-2 solve indirect-object identification? Activation patching, end to end.

IOI prompts look like "When Mary and John went to the store, John gave a drink to" -> " Mary".
The model is `ioi-gpt2-tiny` from the crosspatch zoo: a small GPT-2 trained on such prompts on
your CPU the first time you run this, in one to two minutes (then cached; CROSSPATCH_CACHE moves
the cache). The prompts go in as text: the model comes with its tokenizer.

Each corrupted prompt differs from its clean twin in one factor (the task's pairs say which),
so the clean answer is no longer implied. We patch one clean activation at a time into the
corrupted run and measure how much of the clean logit difference, logit(answer) - logit(distractor),
comes back (1 = all of it):

  * the residual stream entering every layer, at every position: where the information sits;
  * the output of every attention head: which heads move it to the final position.

Heatmaps (PNG), results (JSON, CSV) and a one-page index.html go to --out.

    python examples/ioi_study.py --out crosspatch-out
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import crosspatch as cp
from crosspatch.zoo import store as zoo
from crosspatch.results.report import write_report
from crosspatch.zoo.tasks import get_task

MODEL, TASK = "ioi-gpt2-tiny", "ioi"
SWEEPS = {
    "resid_pre": "resid_pre.*[pos=*]",  # every layer x every position
    "heads": "head_out.*[head=*]",  # every layer x every head
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("crosspatch-out"), help="folder for the report")
    parser.add_argument("--n", type=int, default=48, help="number of prompt pairs (test split)")
    parser.add_argument("--seed", type=int, default=0, help="seed for drawing the prompts")
    args = parser.parse_args()
    start = time.perf_counter()

    # 1. The model and its tokenizer: trained and cached on first use, loaded from the cache afterwards.
    if not zoo.cached(MODEL):
        print(f"training {MODEL} on first use: one to two minutes on a CPU (more on a busy one); cached afterwards...")
    model = cp.wrap(MODEL)
    print(f"{MODEL} ready after {time.perf_counter() - start:.1f} s")

    # 2. Clean / corrupted prompt pairs from the held-out split, as text.
    pairs = get_task(TASK).pairs(args.n, seed=args.seed, split="test")
    clean, corrupt = [p.clean for p in pairs], [p.corrupt for p in pairs]
    print(f"{len(pairs)} pairs, e.g.\n  clean:   {pairs[0].clean!r} -> {pairs[0].answer!r}")
    print(f"  corrupt: {pairs[0].corrupt!r}")

    # 3. The metric: logit(answer) - logit(distractor) at the last position, per prompt (answers as text).
    metric = cp.metrics.logit_diff([p.answer_prefix + p.answer for p in pairs],
                                   [p.answer_prefix + p.distractor for p in pairs])

    # 4. One activation-patching sweep per site pattern; positions come labelled with the first prompt's tokens.
    results = {}
    for name, sites in SWEEPS.items():
        result = cp.activation_patching(model, clean, corrupt, sites, metric, normalize=True)
        results[name] = result
        top = result.to_pandas().sort_values("value", ascending=False).head(3)
        print(f"\n{name}: sites restoring most of the clean-corrupt gap\n{top.to_string(index=False)}")
    baseline = results["heads"].metadata["baseline"]
    print(f"\nlogit diff: clean {baseline['clean']:.2f}, corrupt {baseline['corrupt']:.2f}")

    # 5. Heatmaps, JSON, CSV and index.html in one folder.
    context = {
        "model": f"{MODEL} ({model.describe()['n_layers']} layers, {model.describe()['n_heads']} heads)",
        "task": f"{TASK}, test split",
        "prompts": f"{len(pairs)} pairs, e.g. {pairs[0].clean!r} vs {pairs[0].corrupt!r}",
        "metric": "logit_diff(answer, distractor), denoising, normalised (1 = clean restored)",
        "seed": args.seed,
        "versions": results["heads"].metadata["versions"],
    }
    out = write_report(results, args.out, title=f"IOI in {MODEL}: activation patching", context=context)
    print(f"\nreport: {(out / 'index.html').resolve()}  ({time.perf_counter() - start:.1f} s in all)")


if __name__ == "__main__":
    main()
