"""Causal scrubbing (Chan et al., 2022): test a hypothesis by resampling what it says does not matter.

A :class:`Hypothesis` maps the nodes of a high-level graph onto sites and says, per node, which
inputs are *equivalent* for it: a key function from one input example to a hashable key; two
inputs with equal keys are interchangeable at that node. Scrubbing replaces every node's
activation with its activation on another dataset row that has the same key (drawn uniformly,
seeded; the row itself may be drawn), and every site in ``others`` (parts of the model the
hypothesis says compute nothing that matters) with its activation on *any* row. If the hypothesis
is right, the scrubbed model behaves like the model:

    recovered = (scrubbed - random) / (clean - random)

``clean`` is the metric of the unmodified model, ``random`` the metric with every node and every
``others`` site resampled from any row, ``scrubbed`` the metric under the hypothesis' resampling;
each is the mean over the dataset and over ``samples`` independent draws. It works for a metric
(higher is better) and for a loss alike: the ratio is the same.

**Semantics.** The source activation of a node is the one of the *unmodified* run on the drawn
row (an interchange, as in :func:`crosspatch.methods.activation_patching`); nodes are patched in
the same forward. For hypotheses whose nodes do not feed one another (parallel branches, heads of
one layer, a node and the unlisted remainder) this is exactly causal scrubbing. For a chain
``A -> B`` the full algorithm would also rerun ``B``'s source row with ``A`` scrubbed (a tree of
forwards); here ``B``'s patched value overwrites whatever ``A``'s patch did upstream of it, so ``A``
is tested only through its paths that bypass ``B``.

**Batching.** Every draw is one block of rows: ``samples`` scrubbed blocks and ``samples`` random
blocks of the dataset are stacked along the batch axis, each node is bound with a
:class:`~crosspatch.Patch` whose source cache holds, row by row, the drawn row's clean activation.
The cost is one capture forward of the dataset plus ``2 * samples * n`` rows of forward (in chunks
of ``batch_size`` rows).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..engine.adapter import batch_size as rows_of
from ..engine.forward import Bound, execute
from ..engine.interventions import Patch
from ..results.metrics import Metric, MetricContext
from ..engine.model import WrappedModel, wrap
from ..results.result import Result, collect_versions
from ..trainable.das import take_rows
from .pairs import model_metric

__all__ = ["Hypothesis", "causal_scrubbing", "equivalence_classes", "example"]

@dataclass
class Hypothesis:
    """Nodes of a high-level graph mapped onto sites, each with its equivalence on inputs.

    ``nodes``: ``{site: key}`` where ``key`` is a function ``example -> hashable`` (an example is
    one row of the inputs: ``inputs[i]`` for a tensor, ``{k: v[i]}`` for a dict), a precomputed
    sequence of keys (one per row), or ``None`` (the node computes nothing the hypothesis cares
    about: resampled from any row). ``others``: sites the hypothesis leaves out, resampled from any row.
    ``names`` optionally labels the nodes (``{site: "A"}``) for the result's metadata.
    """

    nodes: Mapping[str, Any]
    others: Sequence[str] = ()
    names: Mapping[str, str] = field(default_factory=dict)

    def sites(self) -> list[str]:
        return list(self.nodes) + [s for s in self.others if s not in self.nodes]


def example(inputs: Any, i: int) -> Any:
    """Row ``i`` of user inputs (a tensor, a dict of batched tensors or a sequence)."""
    if isinstance(inputs, Mapping):
        return {k: (v[i] if isinstance(v, (torch.Tensor, np.ndarray, list, tuple)) else v) for k, v in inputs.items()}
    return inputs[i]


def _hashable(key: Any) -> Hashable:
    if isinstance(key, torch.Tensor):
        key = key.tolist()
    if isinstance(key, np.ndarray):
        key = key.tolist()
    if isinstance(key, list):
        return tuple(_hashable(k) for k in key)
    return key


def equivalence_classes(key: Any, inputs: Any, n: int) -> np.ndarray:
    """One integer class id per row: rows with equal keys share an id (``None``: one class)."""
    if key is None:
        return np.zeros(n, dtype=np.int64)
    if callable(key):
        keys = [_hashable(key(example(inputs, i))) for i in range(n)]
    else:
        keys = [_hashable(k) for k in (key.tolist() if isinstance(key, torch.Tensor) else list(key))]
        if len(keys) != n:
            raise ValueError(f"a precomputed key sequence needs one key per row ({n}), got {len(keys)}")
    ids: dict[Hashable, int] = {}
    return np.array([ids.setdefault(k, len(ids)) for k in keys], dtype=np.int64)


def _draw(classes: np.ndarray, samples: int, rng: np.random.Generator) -> np.ndarray:
    """``[samples, n]`` source rows: for every row, a uniform draw among the rows of its class."""
    n = len(classes)
    out = np.empty((samples, n), dtype=np.int64)
    members = {c: np.flatnonzero(classes == c) for c in np.unique(classes)}
    for c, rows in members.items():
        out[:, rows] = rows[rng.integers(len(rows), size=(samples, len(rows)))]
    return out


def causal_scrubbing(
    model: "WrappedModel | nn.Module",
    inputs: Any,
    hypothesis: Hypothesis,
    metric: "Metric | Callable",
    *,
    samples: int = 4,
    seed: int = 0,
    batch_size: int = 1024,
) -> Result:
    """How much of the metric the hypothesis recovers when everything else is resampled.

    ``metric(output, ctx)`` gives one value per row; ``ctx.example`` is the dataset row a batch row
    belongs to and ``ctx.clean`` the clean output. Returns a Result with dim ``quantity``
    (``clean``, ``scrubbed``, ``random``, ``recovered``); ``metadata["recovered"]`` is the fraction,
    ``metadata["recovered_per_sample"]`` the fraction of each draw alone.
    """
    m = wrap(model)
    metric = model_metric(m, metric)
    prepared = m.prepare(inputs)
    n = rows_of(prepared)
    sites = [m.catalog.resolve(s) for s in hypothesis.sites()]
    keys = sorted({s.key for s in sites})
    clean_run = execute(m.module, m.adapter, m.catalog, prepared, capture=keys)
    clean_out = clean_run.output
    cache = clean_run.cache
    rng = np.random.default_rng(seed)
    # Source rows per site: [samples, n] for the scrubbed blocks, then [samples, n] for the random blocks.
    draws = []
    for site_str, site in zip(hypothesis.sites(), sites):
        key = hypothesis.nodes.get(site_str) if site_str in hypothesis.nodes else None
        scrub = _draw(equivalence_classes(key, inputs, n), samples, rng)
        rand = _draw(np.zeros(n, dtype=np.int64), samples, rng)
        draws.append((site, np.concatenate([scrub, rand]).reshape(-1)))
    total = 2 * samples * n
    per = max(1, batch_size // n) * n  # whole dataset blocks per chunk
    values = []
    device = clean_out.device
    for start in range(0, total, per):
        stop = min(total, start + per)
        rows = np.arange(start, stop) % n
        chunk_inputs = take_rows(prepared, torch.as_tensor(rows), n)
        bounds = []
        for site, src in draws:
            bounds.append(Bound(site, Patch(cache.rows(src[start:stop], [site.key]))))  # the drawn rows' masks too
        out = execute(m.module, m.adapter, m.catalog, chunk_inputs, bounds).output
        ctx = MetricContext(torch.as_tensor(rows, device=device), clean_out, chunk_inputs.get("attention_mask"))
        values.append(metric(out, ctx).double().cpu())
    v = torch.cat(values).view(2, samples, n)
    clean_value = float(metric(clean_out, MetricContext(torch.arange(n, device=device), clean_out,
                                                        prepared.get("attention_mask"))).double().mean())
    scrubbed = v[0].mean(dim=1)
    random = v[1].mean(dim=1)
    s, r = float(scrubbed.mean()), float(random.mean())
    denom = clean_value - r
    recovered = (s - r) / denom if denom != 0 else float("nan")
    per_sample = ((scrubbed - random) / denom).tolist() if denom != 0 else [float("nan")] * samples
    metadata = {
        "method": "causal_scrubbing",
        "metric": metric.name,
        "recovered": recovered,
        "recovered_per_sample": per_sample,
        "nodes": {s: hypothesis.names.get(s, s) for s in hypothesis.nodes},
        "others": list(hypothesis.others),
        "samples": samples,
        "n_examples": n,
        "seed": seed,
        "semantics": "interchange: each node takes the drawn row's clean activation; all nodes in one forward",
        "model": m.describe(),
        "adapter": m.adapter.name,
        "versions": collect_versions(),
    }
    return Result(np.array([clean_value, s, r, recovered]), ("quantity",),
                  {"quantity": ["clean", "scrubbed", "random", "recovered"]}, metadata)
