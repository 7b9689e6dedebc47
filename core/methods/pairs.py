"""The setup every clean/corrupt method shares: wrap, prepare both inputs, check they pair up."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from ..engine.adapter import Inputs, batch_size, model_device
from ..results.metrics import Metric, as_metric
from ..engine.model import WrappedModel, wrap
from ..engine.text import check_same_lengths, is_text
from ..sites.selection import group_patterns, input_groups
from ..sites.site import Site

__all__ = [
    "Pair", "prepare_pair", "check_pair", "check_gap", "label_positions", "model_metric", "same_masks",
    "rows_per_forward", "ACCELERATOR_ROWS",
]

# |clean - corrupt| at or below this, relative to the larger baseline (and absolutely, near 0), is no gap
# to normalise by: float rounding alone makes differences of that size.
_GAP_RTOL, _GAP_ATOL = 1e-5, 1e-7


@dataclass
class Pair:
    """Prepared clean and corrupt inputs; ``base`` is the run patched into, ``source`` the one patched from."""

    model: WrappedModel
    metric: Metric
    clean: Inputs
    corrupt: Inputs
    n: int
    base: Inputs
    source: Inputs
    sizes: dict[str, int]

    def expand(self, sites: Any) -> Any:
        """The sweep of ``sites`` on these inputs (a ``Sweep``); position-group names (``resid_pre.*[pos=image]``)
        become the columns the base inputs give the group."""
        if input_groups(self.base):
            sites = group_patterns([sites] if isinstance(sites, (str, Site)) else list(sites), self.base)
        return self.model.catalog.expand(sites, self.sizes)


def check_pair(clean: Inputs, corrupt: Inputs) -> None:
    """Clean and corrupt inputs are paired row by row and position by position, so shapes must match."""
    for key in clean.keys() & corrupt.keys():
        a, b = clean[key], corrupt[key]
        if isinstance(a, torch.Tensor) and a.shape != b.shape:
            raise ValueError(
                f"clean and corrupt {key!r} have shapes {tuple(a.shape)} and {tuple(b.shape)}; they are paired "
                f"row by row and position by position, so they must match"
            )


def prepare_pair(
    model: "WrappedModel | nn.Module", clean: Any, corrupt: Any, metric: "Metric | Callable", direction: str
) -> Pair:
    """Denoising patches clean activations into the corrupt run; noising the other way round."""
    if direction not in ("denoising", "noising"):
        raise ValueError(f"direction must be 'denoising' or 'noising', got {direction!r}")
    m = wrap(model)
    if is_text(clean) and is_text(corrupt):  # a length mismatch is shown token by token
        check_same_lengths(m.tokenizer, clean, corrupt)
    clean_in, corrupt_in = m.prepare(clean), m.prepare(corrupt)
    check_pair(clean_in, corrupt_in)
    base, source = (corrupt_in, clean_in) if direction == "denoising" else (clean_in, corrupt_in)
    metric = model_metric(m, metric)
    return Pair(m, metric, clean_in, corrupt_in, batch_size(corrupt_in), base, source, m.adapter.sizes(corrupt_in))


def model_metric(m: WrappedModel, metric: "Metric | Callable") -> Metric:
    """``metric`` as a :class:`Metric`, its text answers (``logit_diff(" Mary", " John")``) turned into
    token ids with the model's tokenizer."""
    metric = as_metric(metric)
    return metric.resolve(m.token_id) if metric.needs_tokens else metric


def check_gap(clean: float, corrupt: float, metric: str, names: tuple[str, str] = ("clean", "corrupt")) -> None:
    """Refuse to normalise by a clean-corrupt gap of (about) zero: the values would be NaN or noise.
    ``names`` say what the two baselines are called in the method (path patching: source and base)."""
    gap = clean - corrupt
    if abs(gap) <= _GAP_ATOL + _GAP_RTOL * max(abs(clean), abs(corrupt)):
        a, b = names
        raise ValueError(
            f"normalize=True divides by the {a}-{b} gap of {metric}, which is {gap:.3g} ({a} {clean:.6g}, "
            f"{b} {corrupt:.6g}): the inputs do not change the metric, so there is nothing to restore. Check that "
            f"{a} and {b} differ where the metric looks (and the answers are the right tokens), or use "
            f"normalize=False"
        )


def label_positions(coords: dict[str, list], labels: list[str] | None) -> dict[str, list]:
    """``coords`` with the ``pos`` and ``key_pos`` indices replaced by ``"3 John"``-style token labels."""
    if not labels:
        return coords
    for dim in ("pos", "key_pos"):
        values = coords.get(dim)
        if values and all(isinstance(v, int) and -len(labels) <= v < len(labels) for v in values):
            coords[dim] = [labels[v] for v in values]
    return coords


def same_masks(a: Inputs, b: Inputs) -> bool:
    """Whether two prepared inputs have the same attention mask (or neither has one)."""
    x, y = a.get("attention_mask"), b.get("attention_mask")
    return (x is None and y is None) or (x is not None and y is not None and x.shape == y.shape and torch.equal(x, y))


# Rows per patched forward on an accelerator, where batching is what makes a sweep fast.
ACCELERATOR_ROWS = 64


def rows_per_forward(batch_size: int | None, model: WrappedModel, n: int) -> int:
    """Rows (sites x prompts) a sweep puts in one forward: ``batch_size`` when given; else
    :data:`ACCELERATOR_ROWS` on an accelerator, and ``n`` (one site per forward) on a CPU, where a
    forward's cost grows with its rows so more of them save only the fixed cost of a forward
    (measured within 15% of 64 rows), while its peak memory grows with them."""
    if batch_size is not None:
        return batch_size
    return n if model_device(model.module).type == "cpu" else ACCELERATOR_ROWS
