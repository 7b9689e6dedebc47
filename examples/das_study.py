"""DAS study: where does a toy model keep variable `a`? IIA against subspace size, plotted.

A plain-torch toy from `crosspatch.toys`: inputs (a, b, noise); hidden = R @ [circle(a), circle(b), noise]
with a random rotation R; the output is (a + b) mod 4. So `a` lives in a known 2-d subspace of the
8-d site `hidden`. For k = 1..8 we train a rotated-subspace interchange (DAS) against the high-level
model's counterfactual labels and measure interchange-intervention accuracy on held-out pairs;
a random rotation is the baseline.

    python examples/das_study.py [--out das_study.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import crosspatch as cp
from crosspatch.trainable.das import RotatedSubspace, iia, principal_angles, train_das
from crosspatch.zoo.toys import D, SubspaceToy, subspace_adapter, subspace_pairs as pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_file", nargs="?", default=None, metavar="OUT", help=argparse.SUPPRESS)  # the old spelling
    parser.add_argument("--out", default="das_study.png", help="where the plot goes (default das_study.png)")
    args = parser.parse_args()
    out = args.out_file or args.out
    torch.set_num_threads(1)
    m = cp.wrap(SubspaceToy().eval(), subspace_adapter())
    (base, source, labels), (tb, ts, tl) = pairs(512, seed=1), pairs(512, seed=2)
    true = m.module.hidden.R[:, 0:2]
    sizes, learned, random = list(range(1, D + 1)), [], []
    for k in sizes:
        das = train_das(m, "hidden", base, source, labels, k=k, epochs=10, lr=0.05, progress=False)
        learned.append(iia(m, "hidden", das, tb, ts, tl))
        random.append(iia(m, "hidden", RotatedSubspace(D, k, seed=123), tb, ts, tl))
        angles = principal_angles(das.basis(), true)
        print(f"k={k}: IIA {learned[-1]:.3f} (random rotation {random[-1]:.3f}); "
              f"principal angles to the true plane {[round(a, 1) for a in angles.tolist()]}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.4))
    ax.plot(sizes, learned, "o-", label="DAS (trained rotation)")
    ax.plot(sizes, random, "s--", color="0.5", label="random rotation")
    ax.axvline(2, color="C3", lw=0.8, ls=":", label="true subspace size")
    ax.set(xlabel="subspace size k", ylabel="IIA (held-out pairs)", ylim=(0, 1.05),
           title="Variable a at site `hidden`")
    ax.legend(loc="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    # The same numbers as an interactive page next to the plot (hover a bar for its IIA).
    curves = cp.Result(torch.tensor([learned, random]), ("rotation", "k"),
                       {"rotation": ["DAS (trained)", "random"], "k": sizes},
                       {"method": "das", "metric": "IIA (held-out pairs)", "site": "hidden"})
    page = Path(out).with_suffix(".html")
    page.write_text(curves.to_html(title="DAS: IIA against subspace size at site hidden"), encoding="utf-8")
    print(f"wrote {out} and {page}")


if __name__ == "__main__":
    main()
