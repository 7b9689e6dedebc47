"""Cross-modal information flow (Zhang, Yadav, Han, Shutova, CVPR 2025, arXiv 2411.18620): block the
attention edges between groups of positions (image -> question, image -> last, question -> last) in a
window of layers around each layer, and read the relative change of the answer's probability.

For each edge set and each layer ``l`` the edges are blocked (:class:`~crosspatch.engine.knockout.Knockout`)
in layers ``max(0, l - window // 2) .. min(L - 1, l + window // 2)``, and the answer's probability at each
row's last real token is compared with the plain run's: ``100 * (p_blocked - p) / p`` per item, the mean
over items with a percentile bootstrap interval over items (``n_boot`` resamples, seeded).

Cost: one plain forward, then one forward per edge set with every window's knockout batched along the rows
(``windows_per_forward`` bounds how many windows share one forward). Both use crosspatch's eager attention
(reading or writing patterns switches to it), so a blocked edge that carried no attention changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import torch

from ..engine.adapter import batch_size, repeat_rows
from ..engine.knockout import Knockout, bind
from ..engine.model import WrappedModel
from ..results.result import Result, collect_versions
from ..sites.selection import input_groups
from ..sites.site import SiteError

__all__ = ["DEFAULT_EDGES", "Flow", "cross_modal_flow", "layer_windows"]

#: The edge sets of the paper: (source group, destination group); attention from source keys to destination queries.
DEFAULT_EDGES: dict[str, tuple[str, str]] = {
    "image -> question": ("image", "question"),
    "image -> last": ("image", "last"),
    "question -> last": ("question", "last"),
}


@dataclass
class Flow:
    """Per edge set and layer (the window's centre): the mean % change of the answer probability, its
    bootstrap interval, and the per-item values ``[edges, layer, item]``."""

    change: np.ndarray
    ci_low: np.ndarray
    ci_high: np.ndarray
    per_item: np.ndarray
    edges: list[str]
    windows: list[tuple[int, int]]
    level: float
    n_boot: int
    seed: int
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_result(self) -> Result:
        """A Result with dims ``("edges", "layer", "stat")``, stat mean / ci_low / ci_high."""
        values = np.stack([self.change, self.ci_low, self.ci_high], axis=-1)
        coords = {"edges": list(self.edges), "layer": list(range(len(self.windows))), "stat": ["mean", "ci_low", "ci_high"]}
        meta = {**self.metadata, "level": self.level, "n_boot": self.n_boot, "seed": self.seed,
                "windows": [list(w) for w in self.windows]}
        return Result(values, ("edges", "layer", "stat"), coords, meta)

    def plot(self, ax: Any = None) -> Any:
        """The paper's figure: % change of the answer probability against the layer, one line per edge set,
        its bootstrap interval shaded. Returns the matplotlib axes."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(6, 3.5))
        layers = np.arange(len(self.windows))
        for i, name in enumerate(self.edges):
            ax.plot(layers, self.change[i], marker="o", label=name)
            ax.fill_between(layers, self.ci_low[i], self.ci_high[i], alpha=0.2)
        ax.axhline(0, color="grey", linewidth=0.8)
        width = self.metadata.get("window")
        ax.set_xlabel(f"layer (centre of a {width}-layer window)" if width else "layer")
        ax.set_ylabel("change of answer probability (%)")
        ax.legend()
        return ax


def layer_windows(n_layers: int, window: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]``: for each layer ``l``, the ``window`` layers around it, cut at both ends."""
    if window < 1:
        raise ValueError(f"window is a number of layers, at least 1; got {window}")
    half = window // 2
    return [(max(0, l - half), min(n_layers, l - half + window)) for l in range(n_layers)]


def cross_modal_flow(
    model: WrappedModel,
    items: Any,
    groups: Mapping[str, tuple[str, str]] | None = None,
    window: int = 9,
    answers: "torch.Tensor | list[int] | None" = None,
    *,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    windows_per_forward: int | None = None,
) -> Flow:
    """The % change of the answer probability per edge set (``groups``: ``{name: (src, dst)}``, group names the
    inputs carry; :data:`DEFAULT_EDGES` by default) and per layer window.

    ``items``: the model's inputs (with the ``question`` group for the default edge sets). ``answers``: one token
    id per item; by default each item's top prediction at its last token in the plain run.
    """
    if not isinstance(model, WrappedModel):
        raise TypeError(f"cross_modal_flow takes a wrapped model (cp.wrap(model, adapter)), got {type(model).__name__}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    edges = dict(DEFAULT_EDGES if groups is None else groups)
    inputs = model.prepare(items)
    n = batch_size(inputs)
    carried = input_groups(inputs)
    missing = sorted({g for pair in edges.values() for g in pair} - set(carried))
    if missing:
        raise ValueError(f"edge sets name groups {missing} that the inputs do not carry (they carry {sorted(carried)})")
    if "last" not in carried:
        raise ValueError("the inputs carry no 'last' group (each row's last real token), where the answer is read")
    last = carried["last"].float().argmax(dim=1)
    n_layers = model.catalog.family("attn_pattern").layers
    windows = layer_windows(n_layers, window)
    rows = torch.arange(n, device=last.device)

    def probabilities(output: torch.Tensor, times: int) -> torch.Tensor:
        at_last = output.view(times, n, *output.shape[1:])[:, rows, last.to(output.device)]  # [times, n, vocab]
        return at_last.double().softmax(dim=-1)

    plain = probabilities(model.run(inputs, capture=["attn_pattern.0"]).output, 1)[0]  # the same attention function
    if answers is None:
        answer = plain.argmax(dim=-1)
    else:
        answer = torch.as_tensor(answers, device=plain.device).long().flatten()
        if answer.shape[0] != n:
            raise ValueError(f"answers holds {answer.shape[0]} token ids for {n} items")
    p_plain = plain[rows, answer]
    chunk = windows_per_forward or len(windows)
    per_item = np.zeros((len(edges), len(windows), n))
    for e, (src, dst) in enumerate(edges.values()):
        for start in range(0, len(windows), chunk):
            part = windows[start:start + chunk]
            tiled = repeat_rows(inputs, len(part))
            knockouts = [Knockout(src, dst, layers=range(lo, hi), rows=slice(w * n, (w + 1) * n))
                         for w, (lo, hi) in enumerate(part)]
            out = model.run(tiled, bind(model, tiled, knockouts)).output
            p = probabilities(out, len(part))[:, rows, answer]  # [windows, n]
            per_item[e, start:start + len(part)] = (100 * (p - p_plain) / p_plain).cpu().numpy()

    draws = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    boot = per_item[..., draws].mean(axis=-1)  # [edges, windows, n_boot]
    alpha = (1 - level) / 2
    metadata = {
        "method": "cross_modal_flow", "edges": {k: list(v) for k, v in edges.items()}, "window": window,
        "n_items": n, "answers": answer.tolist(), "model": model.describe(), "adapter": model.adapter.name,
        "versions": collect_versions(),
    }
    return Flow(per_item.mean(axis=-1), np.quantile(boot, alpha, axis=-1), np.quantile(boot, 1 - alpha, axis=-1),
                per_item, list(edges), windows, level, n_boot, seed, metadata)


