"""Distributed alignment search (DAS): find the subspace of a site that carries a causal variable.

An interchange intervention on a learned subspace: rotate the activation (last axis of the site)
by an orthogonal matrix, replace the first ``k`` rotated coordinates with those of a source run,
rotate back. Trained so that the model's output under the intervention matches what a high-level
causal model predicts after interchanging the variable (its counterfactual labels), the subspace
is where the model keeps that variable; interchange-intervention accuracy (:func:`iia`) on held
out pairs says how well the alignment holds.

- :class:`RotatedSubspace`: a full ``d x d`` rotation, interchange of the first ``k`` coordinates;
- :class:`LowRankRotatedSubspace`: an orthonormal ``d x k`` basis only (cheaper for large ``d``);
- :class:`BoundlessDAS`: a full rotation and a learned subspace size, a sigmoid mask over the
  rotated coordinates whose temperature :func:`train_das` anneals.

All three are :class:`~crosspatch.trainable.TrainableIntervention` s: nn.Modules, saved and loaded
with their configuration, applied by the engine like any other intervention.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Literal, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import orthogonal

from ..engine.adapter import batch_size as rows_of
from ..engine.cache import Cache
from ..engine.forward import Bound, execute
from ..engine.interventions import ApplyContext
from ..engine.model import WrappedModel, wrap
from ..progress import progress_bar
from ..results.metrics import answer_ids
from ..sites.selection import row_ends
from ..sites.site import Site, SiteError
from .base import TrainableIntervention, register, source_rows

__all__ = [
    "RotatedSubspace", "LowRankRotatedSubspace", "BoundlessDAS", "train_das", "iia", "principal_angles",
    "last_position", "read_logits", "labels_of", "take_rows",
]

logger = logging.getLogger(__name__)


def _seeded_linear(n_in: int, n_out: int, seed: int) -> nn.Linear:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Linear(n_in, n_out, bias=False)


class _Subspace(TrainableIntervention):
    """Interchange along an orthonormal basis ``Q`` ([d, k]): ``x + ((s - x) Q) Q^T``."""

    dim: int

    def basis(self) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _check(self, x: torch.Tensor, ctx: ApplyContext) -> None:
        if x.shape[-1] != self.dim:
            last = ctx.family.axis_names[-1]
            raise SiteError(
                f"{type(self).__name__} at {ctx.site}: built for {self.dim} dims but the selected {last!r} axis "
                f"has {x.shape[-1]}; build it with dim={x.shape[-1]}"
            )

    def apply(self, x: torch.Tensor, ctx: ApplyContext) -> torch.Tensor:
        self._check(x, ctx)
        src = source_rows(type(self).__name__, x, ctx)
        q = self.basis()
        dtype = torch.promote_types(x.dtype, q.dtype)
        xw, sw, q = x.to(dtype), src.to(dtype), q.to(device=x.device, dtype=dtype)
        return (xw + ((sw - xw) @ q) @ q.T).to(x.dtype)


@register
class RotatedSubspace(_Subspace):
    """DAS with a full orthogonal rotation of the last axis; the first ``k`` rotated coordinates
    are taken from the source. ``k`` may be changed after training (coordinates keep their order)."""

    kind = "das_rotation"

    def __init__(self, dim: int, k: int = 1, seed: int = 0, source: Any = None):
        super().__init__(source)
        if not 1 <= k <= dim:
            raise ValueError(f"k={k} must be between 1 and dim={dim}")
        self.dim, self.k, self.seed = int(dim), int(k), int(seed)
        self.rotation = orthogonal(_seeded_linear(dim, dim, seed))

    def rotation_matrix(self) -> torch.Tensor:
        """``R`` ([d, d], orthogonal): rotated coordinates are ``x @ R``."""
        return self.rotation.weight

    def basis(self) -> torch.Tensor:
        return self.rotation_matrix()[:, : self.k]

    def config(self) -> dict:
        return {"dim": self.dim, "k": self.k, "seed": self.seed}


@register
class LowRankRotatedSubspace(_Subspace):
    """DAS with an orthonormal ``d x k`` basis (no full rotation): interchange its span."""

    kind = "das_low_rank"

    def __init__(self, dim: int, k: int = 1, seed: int = 0, source: Any = None):
        super().__init__(source)
        if not 1 <= k <= dim:
            raise ValueError(f"k={k} must be between 1 and dim={dim}")
        self.dim, self.k, self.seed = int(dim), int(k), int(seed)
        self.projection = orthogonal(_seeded_linear(dim, k, seed))  # weight [k, d] with orthonormal rows

    def basis(self) -> torch.Tensor:
        return self.projection.weight.T

    def config(self) -> dict:
        return {"dim": self.dim, "k": self.k, "seed": self.seed}


@register
class BoundlessDAS(TrainableIntervention):
    """DAS with a learned subspace size: a full rotation and a soft boundary ``b`` in [0, 1].

    Rotated coordinate ``i`` is interchanged with weight ``sigmoid((b * d - i - 0.5) / temperature)``,
    so the first ``≈ b * d`` coordinates move. :func:`train_das` anneals ``temperature`` towards 0,
    making the mask hard; :attr:`size` is the learned number of coordinates.
    """

    kind = "das_boundless"

    def __init__(self, dim: int, init_size: float = 0.5, temperature: float = 1.0, seed: int = 0, source: Any = None):
        super().__init__(source)
        self.dim, self.seed = int(dim), int(seed)
        self.init_size = float(init_size)
        self.rotation = orthogonal(_seeded_linear(dim, dim, seed))
        self.boundary = nn.Parameter(torch.tensor(float(init_size)))
        self.register_buffer("temperature", torch.tensor(float(temperature)))

    def rotation_matrix(self) -> torch.Tensor:
        return self.rotation.weight

    def mask(self) -> torch.Tensor:
        """Interchange weight per rotated coordinate, ``[d]``."""
        size = self.boundary.clamp(1.0 / self.dim, 1.0) * self.dim
        index = torch.arange(self.dim, device=size.device, dtype=size.dtype)
        return torch.sigmoid((size - index - 0.5) / self.temperature)

    @property
    def size(self) -> int:
        """The learned subspace size (coordinates with mask weight above 1/2)."""
        return int((self.mask() > 0.5).sum())

    def set_temperature(self, value: float) -> None:
        self.temperature.fill_(float(value))

    def basis(self) -> torch.Tensor:
        """The rotated coordinates currently interchanged (mask above 1/2), ``[d, size]``."""
        return self.rotation_matrix()[:, self.mask() > 0.5]

    def apply(self, x: torch.Tensor, ctx: ApplyContext) -> torch.Tensor:
        if x.shape[-1] != self.dim:
            raise SiteError(f"BoundlessDAS at {ctx.site}: built for {self.dim} dims, the site has {x.shape[-1]}")
        src = source_rows("BoundlessDAS", x, ctx)
        r = self.rotation_matrix()
        dtype = torch.promote_types(x.dtype, r.dtype)
        xw, sw, r = x.to(dtype), src.to(dtype), r.to(device=x.device, dtype=dtype)
        mask = self.mask().to(device=x.device, dtype=dtype)
        return (xw + (((sw - xw) @ r) * mask) @ r.T).to(x.dtype)

    def config(self) -> dict:
        return {"dim": self.dim, "init_size": self.init_size, "temperature": float(self.temperature), "seed": self.seed}


# -- training and evaluation -----------------------------------------------------------------


def last_position(output: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Logits ``[rows, classes]``: each row's last position of a ``[rows, pos, classes]`` output (with an
    ``attention_mask`` ``[rows, pos]``, each row's last real token, so rows padded on the right are read
    where they end), else the output as is."""
    if output.ndim != 3:
        return output
    if attention_mask is None or attention_mask.shape != output.shape[:2]:
        return output[:, -1]
    last = (row_ends(attention_mask.to(output.device)) - 1).clamp(min=0)
    return output[torch.arange(output.shape[0], device=output.device), last]


def read_logits(logits: Callable[[torch.Tensor], torch.Tensor], output: torch.Tensor, inputs: Mapping[str, Any]) -> torch.Tensor:
    """``logits(output)``; the default :func:`last_position` also reads the inputs' attention mask."""
    if logits is last_position:
        mask = inputs.get("attention_mask")
        return last_position(output, mask if isinstance(mask, torch.Tensor) else None)
    return logits(output)


def take_rows(inputs: Mapping[str, Any], index: torch.Tensor, n: int) -> dict:
    """Rows ``index`` of every batched tensor in prepared inputs (others are kept)."""
    return {
        k: v[index.to(v.device)] if isinstance(v, torch.Tensor) and v.ndim > 0 and v.shape[0] == n else v
        for k, v in inputs.items()
    }


def _source_cache(m: WrappedModel, site: Site, source_in: dict) -> Cache:
    keys = m.capture_keys(site, source_in)
    # clone outside inference mode: slices of it take part in autograd without a copy per step; the
    # attention mask stays, so pos=last reads each source row's last real token
    return execute(m.module, m.adapter, m.catalog, source_in, capture=keys).cache.clone()


def _cache_rows(cache: Cache, index: torch.Tensor) -> Cache:
    return cache.rows(index)


def labels_of(m: WrappedModel, labels: Any, n: int, what: str = "labels") -> torch.Tensor:
    """Class indices ``[n]`` on the model's device: ints, a tensor, or text answers (``" Mary"`` or one string
    per row), each of which must be one token of the model's tokenizer and becomes its id, as a metric's
    answers do (:func:`~crosspatch.results.metrics.answer_ids`)."""
    if isinstance(labels, str):
        raise ValueError(f"{what} is one string, {labels!r}; give one label per pair ({n}), e.g. [{labels!r}] * {n}")
    out = torch.as_tensor(answer_ids(labels, m.token_id, what), device=m.device)
    if out.is_floating_point() or out.shape != (n,):
        raise ValueError(
            f"{what} have {out.dtype} of shape {tuple(out.shape)}; expected one class index (or one-token text) "
            f"per pair, ({n},)"
        )
    return out.long()


def _build(variant: str, dim: int, k: int, seed: int) -> TrainableIntervention:
    if variant == "rotation":
        return RotatedSubspace(dim, k, seed=seed)
    if variant == "low_rank":
        return LowRankRotatedSubspace(dim, k, seed=seed)
    if variant == "boundless":
        return BoundlessDAS(dim, init_size=0.5, seed=seed)
    raise ValueError(f"variant must be 'rotation', 'low_rank' or 'boundless', got {variant!r}")


def _site_dim(m: WrappedModel, site: Site, prepared: dict) -> int:
    fam = m.catalog.family(site.family)
    last = fam.axis_names[-1]
    value = site.selection.get(last)
    size = fam.axes[-1].size or m.adapter.sizes(prepared).get(last)
    if value is None:
        if size is None:
            raise SiteError(f"site {site}: the size of its last axis {last!r} is unknown; pass an intervention")
        return size
    if isinstance(value, int):
        return 1
    if isinstance(value, tuple):
        return len(value)
    return len(range(*slice(value.start, value.stop).indices(size)))  # a Span


class _Frozen:
    """Turn off ``requires_grad`` on a model's parameters for the duration (restored after)."""

    def __init__(self, module: nn.Module):
        self.params = [p for p in module.parameters() if p.requires_grad]

    def __enter__(self):
        for p in self.params:
            p.requires_grad_(False)

    def __exit__(self, *exc):
        for p in self.params:
            p.requires_grad_(True)


def train_das(
    model: "WrappedModel | nn.Module",
    site: "str | Site",
    base_inputs: Any,
    source_inputs: Any,
    labels: Any,
    *,
    intervention: TrainableIntervention | None = None,
    variant: Literal["rotation", "low_rank", "boundless"] = "rotation",
    k: int = 1,
    epochs: int = 10,
    batch_size: int = 64,
    lr: float = 1e-2,
    temperature: tuple[float, float] = (1.0, 0.01),
    size_penalty: float = 0.0,
    seed: int = 0,
    logits: Callable[[torch.Tensor], torch.Tensor] = last_position,
    progress: bool | None = None,
) -> TrainableIntervention:
    """Train a DAS intervention at ``site`` so the model's output under interchange matches ``labels``.

    Pair ``i`` runs ``base_inputs[i]`` with the subspace at ``site`` taken from ``source_inputs[i]``;
    ``labels[i]`` is the class the high-level causal model predicts after interchanging the variable: an
    int, or for a language model a one-token text (``" Mary"``), turned into its id with the model's
    tokenizer. ``logits`` (default: each row's last real token) reads the class scores from the output.
    The loss is the cross-entropy of ``logits(output)`` against ``labels`` (plus, for BoundlessDAS,
    ``size_penalty`` times the subspace size as a fraction of ``d``); only the intervention's
    parameters train, the model's are frozen and left untouched. For BoundlessDAS the mask
    temperature goes geometrically from ``temperature[0]`` to ``temperature[1]``.

    Returns the trained intervention (moved to the model's device) with ``.history``, the mean loss per epoch.
    """
    m = wrap(model)
    site = m.catalog.resolve(site)
    base_in, source_in = m.prepare(base_inputs), m.prepare(source_inputs)
    n = rows_of(base_in)
    if rows_of(source_in) != n:
        raise ValueError(f"{n} base inputs but {rows_of(source_in)} source inputs; DAS pairs them row by row")
    y = labels_of(m, labels, n)
    if intervention is None:
        intervention = _build(variant, _site_dim(m, site, base_in), k, seed)
    intervention = intervention.to(m.device)
    intervention.train()
    source = _source_cache(m, site, source_in)
    optimizer = torch.optim.Adam(intervention.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    steps = epochs * math.ceil(n / batch_size)
    boundless = isinstance(intervention, BoundlessDAS)
    history, step = [], 0
    with _Frozen(m.module):
        for _ in progress_bar(range(epochs), progress, desc=f"DAS at {site}"):
            order = torch.randperm(n, generator=gen)
            total = torch.zeros((), device=m.device)
            for start in range(0, n, batch_size):
                idx = order[start : start + batch_size]
                if boundless:
                    t0, t1 = temperature
                    intervention.set_temperature(t0 * (t1 / t0) ** (step / max(1, steps - 1)))
                intervention.source = _cache_rows(source, idx)
                batch = take_rows(base_in, idx, n)
                run = execute(m.module, m.adapter, m.catalog, batch, [Bound(site, intervention)], grad=True)
                loss = F.cross_entropy(read_logits(logits, run.output, batch).float(), y[idx.to(y.device)])
                if boundless and size_penalty:
                    loss = loss + size_penalty * intervention.boundary.clamp(0.0, 1.0)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total = total + loss.detach() * len(idx)
                step += 1
            history.append(total / n)
    intervention.source = None
    intervention.eval()
    intervention.history = torch.stack(history).tolist()
    logger.info("DAS at %s: final loss %.4f", site, intervention.history[-1] if intervention.history else float("nan"))
    return intervention


def iia(
    model: "WrappedModel | nn.Module",
    site: "str | Site",
    intervention: TrainableIntervention,
    base_inputs: Any,
    source_inputs: Any,
    labels: Any,
    *,
    batch_size: int = 256,
    logits: Callable[[torch.Tensor], torch.Tensor] = last_position,
) -> float:
    """Interchange-intervention accuracy: the fraction of pairs whose argmax under the intervention
    equals the high-level model's counterfactual label."""
    m = wrap(model)
    site = m.catalog.resolve(site)
    base_in, source_in = m.prepare(base_inputs), m.prepare(source_inputs)
    n = rows_of(base_in)
    y = labels_of(m, labels, n)
    source = _source_cache(m, site, source_in)
    previous = intervention.source
    correct = torch.zeros((), device=m.device)
    try:
        for start in range(0, n, batch_size):
            idx = torch.arange(start, min(n, start + batch_size))
            intervention.source = _cache_rows(source, idx)
            batch = take_rows(base_in, idx, n)
            run = execute(m.module, m.adapter, m.catalog, batch, [Bound(site, intervention)])
            correct = correct + (read_logits(logits, run.output, batch).argmax(-1) == y[idx.to(y.device)]).sum()
    finally:
        intervention.source = previous
    return float(correct) / n


def principal_angles(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Principal angles (degrees, ascending) between the column spans of ``a`` [d, k] and ``b`` [d, l]."""
    qa = torch.linalg.qr(a.detach().double())[0]
    qb = torch.linalg.qr(b.detach().double().to(qa.device))[0]
    cos = torch.linalg.svdvals(qa.T @ qb).clamp(-1.0, 1.0)
    return torch.rad2deg(torch.arccos(cos)).sort().values
