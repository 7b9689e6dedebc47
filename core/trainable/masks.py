"""Learned masks: a differentiable binary mask over sites, neurons or latent dims, with a sparsity penalty.

:class:`LearnedMask` keeps the activation where its gate is 1 and replaces it with an ablation
value (zero, a source run's activation, or the source's mean) where the gate is 0:

    out = z * x + (1 - z) * ablated

The gate ``z`` has the mask's ``shape``, broadcast over the selected activation ``[rows, *axes]``:
``shape=(d,)`` masks each unit along the last axis, ``shape=(1,)`` the whole site. Two relaxations:

- ``"hard_concrete"`` (Louizos et al., 2018): stochastic gates in training, exact zeros and ones
  possible; the expected L0 norm is differentiable;
- ``"sigmoid"``: ``sigmoid(logits / temperature)``, deterministic; the training loop anneals the
  temperature so the gates become binary.

:func:`train_masks` finds the smallest masks that keep the model's behaviour: it minimises the KL
divergence from the unmasked output (or the cross-entropy to given labels) plus ``sparsity`` times
the expected fraction of units kept.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Literal, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..engine.adapter import batch_size as rows_of
from ..engine.cache import Cache
from ..engine.forward import Bound, execute
from ..engine.interventions import ApplyContext
from ..engine.model import WrappedModel, wrap
from ..progress import progress_bar
from ..sites.site import Site, SiteError
from .base import TrainableIntervention, register, source_rows
from .das import _Frozen, _cache_rows, _site_dim, labels_of, last_position, read_logits, take_rows

__all__ = ["LearnedMask", "train_masks", "masked_output"]

logger = logging.getLogger(__name__)

# hard-concrete stretch interval and temperature (Louizos et al., 2018)
_GAMMA, _ZETA, _BETA = -0.1, 1.1, 2.0 / 3.0


def relaxed_gates(logits: torch.Tensor, mode: str, temperature: Any = 1.0, noise_shape=None) -> torch.Tensor:
    """Training-time gates in [0, 1]: ``sigmoid(logits / T)``, or hard-concrete samples (Louizos et al.)
    with noise of ``noise_shape`` (default: the logits' shape) broadcast against the logits."""
    if mode == "sigmoid":
        return torch.sigmoid(logits / temperature)
    shape = logits.shape if noise_shape is None else noise_shape
    u = torch.rand(shape, dtype=logits.dtype, device=logits.device).clamp(1e-6, 1 - 1e-6)
    s = torch.sigmoid((u.log() - (-u).log1p() + logits) / _BETA)
    return (s * (_ZETA - _GAMMA) + _GAMMA).clamp(0.0, 1.0)


def expected_open(logits: torch.Tensor, mode: str, temperature: Any = 1.0) -> torch.Tensor:
    """The expected number of open gates (differentiable): the sparsity penalty."""
    if mode == "sigmoid":
        return torch.sigmoid(logits / temperature).sum()
    return torch.sigmoid(logits - _BETA * math.log(-_GAMMA / _ZETA)).sum()


def kept_gates(logits: torch.Tensor, mode: str) -> torch.Tensor:
    """The binary mask: True where the deterministic gate is above 1/2."""
    if mode == "sigmoid":
        return logits > 0
    return (torch.sigmoid(logits) * (_ZETA - _GAMMA) + _GAMMA) > 0.5


@register
class LearnedMask(TrainableIntervention):
    """A learned gate per unit: keep the activation (1) or ablate it (0).

    ``ablation`` is ``"zero"``, ``"source"`` (the source run's activation, row by row) or
    ``"mean"`` (the source rows' mean); the last two read ``source`` like :class:`~crosspatch.Patch`.
    """

    kind = "learned_mask"

    def __init__(
        self,
        shape: "int | Sequence[int]",
        mode: Literal["hard_concrete", "sigmoid"] = "hard_concrete",
        ablation: Literal["zero", "source", "mean"] = "zero",
        init: float = 3.0,
        temperature: float = 1.0,
        source: Any = None,
    ):
        super().__init__(source)
        if mode not in ("hard_concrete", "sigmoid"):
            raise ValueError(f"mode must be 'hard_concrete' or 'sigmoid', got {mode!r}")
        if ablation not in ("zero", "source", "mean"):
            raise ValueError(f"ablation must be 'zero', 'source' or 'mean', got {ablation!r}")
        self.shape = (int(shape),) if isinstance(shape, int) else tuple(int(s) for s in shape)
        self.mode, self.ablation, self.init = mode, ablation, float(init)
        self.logits = nn.Parameter(torch.full(self.shape, float(init)))
        self.register_buffer("temperature", torch.tensor(float(temperature)))

    def set_temperature(self, value: float) -> None:
        self.temperature.fill_(float(value))

    def gate(self) -> torch.Tensor:
        """The gate values. Training mode: relaxed (sampled for hard concrete, ``sigmoid(logits / T)``
        for sigmoid). Eval mode: the binary mask :meth:`kept` (so an evaluated mask is exactly a subset)."""
        if not self.training:
            return self.kept().to(self.logits.dtype)
        return relaxed_gates(self.logits, self.mode, self.temperature)

    def expected_l0(self) -> torch.Tensor:
        """Expected number of gates that are open (differentiable)."""
        return expected_open(self.logits, self.mode, self.temperature)

    def kept(self) -> torch.Tensor:
        """The binary mask: True where the (deterministic) gate is above 1/2."""
        return kept_gates(self.logits, self.mode)

    def apply(self, x: torch.Tensor, ctx: ApplyContext) -> torch.Tensor:
        z = self.gate()
        try:
            torch.broadcast_shapes(z.shape, x.shape[1:])
        except RuntimeError:
            raise SiteError(
                f"LearnedMask at {ctx.site}: mask shape {self.shape} does not broadcast to the selected activation "
                f"{tuple(x.shape[1:])} (axes {', '.join(ctx.family.axis_names)})"
            ) from None
        dtype = torch.promote_types(x.dtype, z.dtype)
        xw = x.to(dtype)
        z = z.to(device=x.device, dtype=dtype)
        if self.ablation == "zero":
            return (z * xw).to(x.dtype)
        src = source_rows("LearnedMask", x, ctx).to(dtype)
        if self.ablation == "mean":
            src = src.mean(dim=0, keepdim=True)
        return (src + z * (xw - src)).to(x.dtype)

    def config(self) -> dict:
        return {
            "shape": list(self.shape), "mode": self.mode, "ablation": self.ablation, "init": self.init,
            "temperature": float(self.temperature),
        }


def _default_shape(m: WrappedModel, site: Site, prepared: dict, per: str) -> tuple[int, ...]:
    if per == "site":
        return (1,)
    if per == "unit":
        return (_site_dim(m, site, prepared),)
    raise ValueError(f"per must be 'unit' (one gate per unit of the last axis) or 'site', got {per!r}")


def masked_output(
    model: "WrappedModel | nn.Module", masks: Mapping["str | Site", LearnedMask], inputs: Any, source: Any = None
) -> torch.Tensor:
    """The model's output with every mask applied (eval mode: deterministic gates)."""
    m = wrap(model)
    previous = {}
    for site, mask in masks.items():
        previous[id(mask)] = (mask.training, mask.source)
        mask.eval()
        if mask.ablation != "zero":
            mask.source = source if source is not None else mask.source
    try:
        return m.run(inputs, [Bound(Site.parse(s), mask) for s, mask in masks.items()]).output
    finally:
        for mask in masks.values():
            mask.train(previous[id(mask)][0])
            mask.source = previous[id(mask)][1]


def train_masks(
    model: "WrappedModel | nn.Module",
    sites: "str | Site | Sequence[str | Site]",
    inputs: Any,
    *,
    labels: Any = None,
    source: Any = None,
    masks: Mapping[str, LearnedMask] | None = None,
    per: Literal["unit", "site"] = "unit",
    mode: Literal["hard_concrete", "sigmoid"] = "hard_concrete",
    ablation: Literal["zero", "source", "mean"] = "zero",
    sparsity: float = 1.0,
    epochs: int = 50,
    batch_size: int = 128,
    lr: float = 0.1,
    temperature: tuple[float, float] = (1.0, 0.05),
    seed: int = 0,
    logits: Callable[[torch.Tensor], torch.Tensor] = last_position,
    progress: bool | None = None,
) -> dict[str, LearnedMask]:
    """Learn the smallest masks over ``sites`` that keep the model's behaviour on ``inputs``.

    The loss is the KL divergence of the masked output from the unmasked one (or, with ``labels``, ints
    or one-token texts as DAS takes them, the cross-entropy to them) plus ``sparsity`` times the expected
    fraction of gates open, summed over sites. A list of sites with ``per="site"`` learns which whole sites matter; ``per="unit"``
    learns which units (neurons, latent dims: the last axis) matter within each site. For
    ``mode="sigmoid"`` the temperature goes geometrically from ``temperature[0]`` to
    ``temperature[1]``. Only the masks train; the model is left untouched.

    Returns ``{site string: LearnedMask}`` in eval mode; ``mask.kept()`` is the binary mask.
    """
    m = wrap(model)
    site_list = [sites] if isinstance(sites, (str, Site)) else list(sites)
    resolved = [m.catalog.resolve(s) for s in site_list]
    prepared = m.prepare(inputs)
    n = rows_of(prepared)
    if masks is None:
        masks = {
            str(s): LearnedMask(_default_shape(m, s, prepared, per), mode=mode, ablation=ablation,
                                temperature=temperature[0])
            for s in resolved
        }
    else:
        masks = {str(m.catalog.resolve(k)): v for k, v in masks.items()}
    modules = nn.ModuleList(masks.values()).to(m.device)
    needs_source = any(mask.ablation != "zero" for mask in masks.values())
    src_cache = None
    if needs_source:
        if source is None:
            raise ValueError(f"ablation={ablation!r} reads a source run; pass source= (inputs or a Cache)")
        if isinstance(source, Cache):
            src_cache = source
        else:
            src_in = m.prepare(source)
            keys = m.capture_keys(resolved, src_in)
            src_cache = execute(m.module, m.adapter, m.catalog, src_in, capture=keys).cache.clone()  # its mask kept
        if src_cache.batch_size not in (1, n):
            raise ValueError(f"the source has {src_cache.batch_size} rows; give 1 or one per input row ({n})")
    with torch.inference_mode():
        clean = read_logits(logits, execute(m.module, m.adapter, m.catalog, prepared).output, prepared).float()
    clean = clean.clone()
    target = None if labels is None else labels_of(m, labels, n)  # ints or one-token texts
    total_units = sum(math.prod(mask.shape) for mask in masks.values())
    bounds = [Bound(Site.parse(s), mask) for s, mask in masks.items()]
    optimizer = torch.optim.Adam(modules.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    steps = epochs * math.ceil(n / batch_size)
    step = 0
    history = []
    modules.train()
    with _Frozen(m.module), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _ in progress_bar(range(epochs), progress, desc=f"masks over {len(masks)} sites"):
            order = torch.randperm(n, generator=gen)
            total = torch.zeros((), device=m.device)
            for start in range(0, n, batch_size):
                idx = order[start : start + batch_size]
                t0, t1 = temperature
                for mask in masks.values():
                    if mask.mode == "sigmoid":
                        mask.set_temperature(t0 * (t1 / t0) ** (step / max(1, steps - 1)))
                    if src_cache is not None:
                        mask.source = src_cache if src_cache.batch_size == 1 else _cache_rows(src_cache, idx)
                batch = take_rows(prepared, idx, n)
                run = execute(m.module, m.adapter, m.catalog, batch, bounds, grad=True)
                out = read_logits(logits, run.output, batch).float()
                dev_idx = idx.to(out.device)
                if target is None:
                    fit = F.kl_div(out.log_softmax(-1), clean[dev_idx].log_softmax(-1), log_target=True,
                                   reduction="batchmean")
                else:
                    fit = F.cross_entropy(out, target[dev_idx])
                size = sum(mask.expected_l0() for mask in masks.values()) / total_units
                loss = fit + sparsity * size
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total = total + loss.detach() * len(idx)
                step += 1
            history.append(total / n)
    losses = torch.stack(history).tolist()
    for mask in masks.values():
        mask.eval()
        mask.source = None
        mask.history = losses
    logger.info("masks over %d sites: final loss %.4f", len(masks), losses[-1] if losses else float("nan"))
    return masks
