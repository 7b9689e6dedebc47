"""Interchange intervention training (IIT): train a model so a high-level variable sits at a chosen site.

Given a high-level causal model, an *alignment* maps sites of the network to its variables. For a
base and a source input, the high-level model says what the output becomes when the variable takes
its value from the source (the counterfactual label). IIT trains the network so that patching the
aligned site from the source run gives that label (Geiger et al., 2022), next to the ordinary task
loss on the base inputs. Strict IIT also patches sites aligned to *no* variable and trains the
output to stay the base label, so those sites carry nothing the output uses.

Unlike DAS, the model's own parameters train here; every run goes through the engine.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..engine.adapter import batch_size as rows_of
from ..engine.cache import Cache
from ..engine.forward import Bound, execute
from ..engine.interventions import Patch
from ..engine.model import WrappedModel, wrap
from ..progress import progress_bar
from ..sites.site import Site
from ..trainable.das import labels_of, last_position, read_logits, take_rows

__all__ = ["train_iit", "interchange_accuracy", "interchange_effect"]

logger = logging.getLogger(__name__)


def _source_cache(m: WrappedModel, sites: Sequence[Site], inputs: dict) -> Cache:
    keys = list(dict.fromkeys(k for s in sites for k in m.capture_keys(s, inputs)))
    return execute(m.module, m.adapter, m.catalog, inputs, capture=keys).cache.clone()  # its mask kept


def train_iit(
    model: "WrappedModel | nn.Module",
    alignment: Mapping["str | Site", Any],
    base_inputs: Any,
    source_inputs: Any,
    base_labels: Any,
    *,
    strict_sites: "Sequence[str | Site]" = (),
    task_weight: float = 1.0,
    iit_weight: float = 1.0,
    strict_weight: float = 1.0,
    epochs: int = 50,
    batch_size: int = 128,
    lr: float = 1e-2,
    seed: int = 0,
    optimizer: torch.optim.Optimizer | None = None,
    logits: Callable[[torch.Tensor], torch.Tensor] = last_position,
    progress: bool | None = None,
) -> list[float]:
    """Train ``model`` in place so that each site of ``alignment`` carries its high-level variable.

    ``alignment`` maps a site to the counterfactual labels of interchanging its variable, one per
    (base, source) pair: ``labels[i]`` is the high-level model's output on ``base_inputs[i]`` with the
    variable set to its value on ``source_inputs[i]`` (labels are ints, or one-token texts such as ``" Mary"``
    turned into ids with the model's tokenizer). ``base_labels`` are the task labels of the base
    inputs. Per batch the loss is

        task_weight * CE(model(base), base_labels)
        + iit_weight * sum over aligned sites of CE(model(base | site <- source), counterfactual labels)
        + strict_weight * sum over strict_sites of CE(model(base | site <- source), base_labels)

    (strict IIT when ``strict_sites`` is not empty). Source activations are taken from the current
    model without gradient, as in the reference implementation's interchange. Returns the mean loss per epoch.
    """
    m = wrap(model)
    aligned = {m.catalog.resolve(s): labels for s, labels in alignment.items()}
    strict = [m.catalog.resolve(s) for s in strict_sites]
    base_in, source_in = m.prepare(base_inputs), m.prepare(source_inputs)
    n = rows_of(base_in)
    if rows_of(source_in) != n:
        raise ValueError(f"{n} base inputs but {rows_of(source_in)} source inputs; IIT pairs them row by row")
    y_base = labels_of(m, base_labels, n, "base_labels")
    y_cf = {s: labels_of(m, labels, n, f"labels of {s}") for s, labels in aligned.items()}
    params = [p for p in m.module.parameters() if p.requires_grad]
    opt = optimizer or torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    was_training = m.module.training
    m.module.train()
    history = []
    try:
        for _ in progress_bar(range(epochs), progress, desc="IIT"):
            order = torch.randperm(n, generator=gen)
            total = torch.zeros((), device=m.device)
            for start in range(0, n, batch_size):
                idx = order[start : start + batch_size]
                dev = idx.to(m.device)
                base = take_rows(base_in, idx, n)
                source = _source_cache(m, [*aligned, *strict], take_rows(source_in, idx, n))
                patch = Patch(source)
                run = execute(m.module, m.adapter, m.catalog, base, grad=True)
                loss = task_weight * F.cross_entropy(read_logits(logits, run.output, base).float(), y_base[dev])
                for site, y in y_cf.items():
                    out = execute(m.module, m.adapter, m.catalog, base, [Bound(site, patch)], grad=True).output
                    loss = loss + iit_weight * F.cross_entropy(read_logits(logits, out, base).float(), y[dev])
                for site in strict:
                    out = execute(m.module, m.adapter, m.catalog, base, [Bound(site, patch)], grad=True).output
                    loss = loss + strict_weight * F.cross_entropy(read_logits(logits, out, base).float(), y_base[dev])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total = total + loss.detach() * len(idx)
            history.append(total / n)
    finally:
        m.module.train(was_training)
    losses = torch.stack(history).tolist() if history else []
    logger.info("IIT: final loss %.4f", losses[-1] if losses else float("nan"))
    return losses


def _patched_predictions(m: WrappedModel, site: Site, base_in: dict, source_in: dict, batch_size: int, logits):
    n = rows_of(base_in)
    preds = []
    for start in range(0, n, batch_size):
        idx = torch.arange(start, min(n, start + batch_size))
        source = _source_cache(m, [site], take_rows(source_in, idx, n))
        base = take_rows(base_in, idx, n)
        run = execute(m.module, m.adapter, m.catalog, base, [Bound(site, Patch(source))])
        preds.append(read_logits(logits, run.output, base).argmax(-1))
    return torch.cat(preds)


def interchange_accuracy(
    model: "WrappedModel | nn.Module",
    site: "str | Site",
    base_inputs: Any,
    source_inputs: Any,
    labels: Any,
    *,
    batch_size: int = 256,
    logits: Callable[[torch.Tensor], torch.Tensor] = last_position,
) -> float:
    """IIA of a plain interchange (:class:`~crosspatch.Patch`) at ``site``: the fraction of pairs whose
    prediction after patching from the source equals the counterfactual label."""
    m = wrap(model)
    site = m.catalog.resolve(site)
    base_in, source_in = m.prepare(base_inputs), m.prepare(source_inputs)
    y = labels_of(m, labels, rows_of(base_in))
    preds = _patched_predictions(m, site, base_in, source_in, batch_size, logits)
    return float((preds == y).float().mean())


def interchange_effect(
    model: "WrappedModel | nn.Module",
    site: "str | Site",
    base_inputs: Any,
    source_inputs: Any,
    *,
    batch_size: int = 256,
    logits: Callable[[torch.Tensor], torch.Tensor] = last_position,
) -> float:
    """The fraction of pairs whose prediction changes when ``site`` is patched from the source
    (0 for a site the output does not read)."""
    m = wrap(model)
    site = m.catalog.resolve(site)
    base_in, source_in = m.prepare(base_inputs), m.prepare(source_inputs)
    with torch.inference_mode():
        clean = read_logits(logits, execute(m.module, m.adapter, m.catalog, base_in).output, base_in).argmax(-1)
    preds = _patched_predictions(m, site, base_in, source_in, batch_size, logits)
    return float((preds != clean).float().mean())
