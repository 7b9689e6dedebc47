"""Split a study into independent shards and merge their results back into the one Result a local run
gives.

A shard is a block of the sweep's concrete sites times a block of prompt rows. It runs through the
public method itself (``activation_patching`` or ``attribution_patching``) on those sites and rows,
so a shard computes exactly what the local run computes for them:

* site blocks are independent (a site's value never depends on the other sites of a sweep), and a
  block of activation-patching sites starts at a multiple of the sites one forward holds, so each
  forward sees the same rows as in the local run;
* row blocks are combined as prompt-weighted means (the methods average over prompts), and the
  normalisation divides by the gap of *all* prompts. A row block runs with a metric that sees the
  global prompt index, so per-prompt targets (answer tokens) line up. AtP*'s GradDrop scores are
  not linear in the prompts, so GradDrop shards by sites only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..methods.activation_patching import activation_patching
from ..methods.attribution import attribution_patching
from ..methods.pairs import ACCELERATOR_ROWS
from ..results.metrics import Metric, MetricContext
from ..engine.model import WrappedModel
from ..results.result import Result, collect_versions
from ..sites.site import Site

__all__ = ["Study", "Shard", "ShardOutput", "plan_study", "split", "run_shard", "merge", "SHARDABLE"]

#: The methods a study can be sharded for, by name: each shard runs the plain method on its block.
SHARDABLE: dict[str, Callable[..., Result]] = {
    "activation_patching": activation_patching,
    "attribution_patching": attribution_patching,
}


@dataclass
class Study:
    """Everything the shards of one run share: prepared inputs (on the CPU), the concrete sites, the
    metric and the method's options. Shipped once to every worker."""

    method: str
    clean: dict[str, torch.Tensor]
    corrupt: dict[str, torch.Tensor]
    sites: tuple[Site, ...]
    dims: tuple[str, ...]
    coords: dict[str, list]
    metric: Metric
    normalize: bool
    options: dict[str, Any]
    sites_label: Any

    @property
    def n(self) -> int:
        return next(iter(self.corrupt.values())).shape[0]


@dataclass(frozen=True)
class Shard:
    """Sites ``[sites[0], sites[1])`` of the sweep times prompt rows ``[rows[0], rows[1])``."""

    index: int
    sites: tuple[int, int]
    rows: tuple[int, int]

    @property
    def tag(self) -> str:
        return f"s{self.sites[0]}-{self.sites[1]}_r{self.rows[0]}-{self.rows[1]}"

    def describe(self, study: Study | None = None) -> str:
        a, b = self.sites
        if study is not None:
            names = study.sites[a:b]
            shown = str(names[0]) if len(names) == 1 else f"{names[0]} .. {names[-1]}"
            where = f"{b - a} site(s) {shown} (#{a}:{b})"
        else:
            where = f"sites #{a}:{b}"
        return f"shard {self.index} ({where}, prompt rows {self.rows[0]}:{self.rows[1]})"


@dataclass
class ShardOutput:
    """What a shard sends back: per-site values (a mean over its rows), its baselines, its row count."""

    values: list[float]
    clean: float
    corrupt: float
    rows: int
    normalized: bool
    metadata: dict[str, Any] = field(default_factory=dict)
    atp: list[float] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "values": self.values, "clean": self.clean, "corrupt": self.corrupt, "rows": self.rows,
            "normalized": self.normalized, "metadata": self.metadata, "atp": self.atp,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ShardOutput":
        return cls(**data)


def plan_study(
    model: WrappedModel, method: str, clean: Any, corrupt: Any, sites: Any, metric: "Metric | Callable",
    normalize: bool, options: dict[str, Any],
) -> Study:
    """Prepare the inputs and expand the sites once, as the method itself would."""
    from ..methods.pairs import prepare_pair

    if method not in SHARDABLE:
        raise ValueError(f"{method!r} cannot be sharded; methods that can: {', '.join(SHARDABLE)}")
    pair = prepare_pair(model, clean, corrupt, metric, options.get("direction", "denoising"))
    sweep = pair.model.catalog.expand(sites, pair.sizes)
    label = str(sites) if isinstance(sites, (str, Site)) else [str(s) for s in sites]
    cpu = lambda inputs: {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}  # noqa: E731
    return Study(method, cpu(pair.clean), cpu(pair.corrupt), sweep.sites, sweep.dims, dict(sweep.coords),
                 pair.metric, normalize, dict(options), label)


def split(study: Study, workers: int, sites_per_shard: int | None = None, rows_per_shard: int | None = None) -> list[Shard]:
    """Cut the study into shards; ``None`` sizes pick a split that keeps ``workers`` busy."""
    n_sites, n = len(study.sites), study.n
    grad_drop = bool(study.options.get("grad_drop"))
    if rows_per_shard is not None and rows_per_shard < n and grad_drop:
        raise ValueError(
            "AtP* GradDrop scores are not linear in the prompts, so its shards cannot split prompt rows; "
            "leave rows_per_shard=None (GradDrop then shards by sites)"
        )
    if study.method == "attribution_patching" and not grad_drop:
        # One pass covers every site: more workers means fewer prompts each.
        rows_per_shard = rows_per_shard or math.ceil(n / (2 * workers))
        sites_per_shard = sites_per_shard or n_sites
    elif sites_per_shard is None:
        sites_per_shard = math.ceil(n_sites / (4 * workers if study.method == "activation_patching" else workers))
    rows_per_shard = min(rows_per_shard or n, n)
    if study.method == "activation_patching":
        # Whole forwards: a block starts where a local forward starts, so the rows each forward sees match.
        # (a batch size left to the device is planned as an accelerator's)
        per_forward = max(1, (study.options.get("batch_size") or ACCELERATOR_ROWS) // rows_per_shard)
        sites_per_shard = per_forward * math.ceil(sites_per_shard / per_forward)
    for name, size in (("sites_per_shard", sites_per_shard), ("rows_per_shard", rows_per_shard)):
        if size < 1:
            raise ValueError(f"{name} must be a positive int, got {size}")
    shards = []
    for a in range(0, n_sites, sites_per_shard):
        for r in range(0, n, rows_per_shard):
            shards.append(Shard(len(shards), (a, min(a + sites_per_shard, n_sites)), (r, min(r + rows_per_shard, n))))
    return shards


class _GlobalRowContext(MetricContext):
    """The metric context of a row block, with prompt indices of the whole study.

    ``clean`` is laid out by global prompt index too (built on first use: only metrics that compare
    to the clean output, such as ``kl_to_clean``, pay for it; rows outside the block stay zero and are
    never indexed)."""

    def __init__(self, ctx: MetricContext, start: int, total: int):
        self.example = ctx.example + start
        self.attention_mask = ctx.attention_mask
        self._local_clean, self._start, self._total, self._global_clean = ctx.clean, start, total, None

    @property
    def clean(self) -> torch.Tensor | None:
        local = self._local_clean
        if local is None:
            return None
        if self._global_clean is None:
            full = local.new_zeros((self._total, *local.shape[1:]))
            full[self._start : self._start + local.shape[0]] = local
            self._global_clean = full
        return self._global_clean


class _RowBlockMetric:
    """The study's metric for prompt rows ``[start, start + k)``: it sees global prompt indices."""

    def __init__(self, inner: Metric, start: int, total: int):
        self.inner, self.start, self.total = inner, start, total

    def __call__(self, output: torch.Tensor, ctx: MetricContext) -> torch.Tensor:
        return self.inner(output, _GlobalRowContext(ctx, self.start, self.total))


def run_shard(model: WrappedModel, study: Study, shard: Shard) -> ShardOutput:
    """Run one shard through the public method (on the worker that holds ``model``)."""
    (a, b), (r0, r1) = shard.sites, shard.rows
    whole = (r0, r1) == (0, study.n)
    device = model.device
    rows = lambda inputs: {  # noqa: E731
        k: v[r0:r1].to(device) if isinstance(v, torch.Tensor) and v.ndim > 0 else v for k, v in inputs.items()
    }
    metric = study.metric if whole else Metric(study.metric.name, _RowBlockMetric(study.metric, r0, study.n))
    quiet = {"progress": False} if study.method == "activation_patching" else {}
    result = SHARDABLE[study.method](
        model, rows(study.clean), rows(study.corrupt), list(study.sites[a:b]), metric,
        normalize=study.normalize and whole, **quiet, **study.options,
    )
    meta = result.metadata
    atp = meta.get("atp")
    return ShardOutput(
        [float(v) for v in result.values.reshape(-1)], meta["baseline"]["clean"], meta["baseline"]["corrupt"],
        r1 - r0, study.normalize and whole, meta, None if atp is None else [float(v) for v in atp],
    )


def _combine(study: Study, shards: Sequence[Shard], outputs: dict[int, ShardOutput], field_name: str) -> np.ndarray:
    """Per-site values over all rows: one row block is taken as it is, several are prompt-weighted."""
    total = np.zeros(len(study.sites))
    for shard in shards:
        out = outputs[shard.index]
        part = np.asarray(getattr(out, field_name), dtype=np.float64)
        a, b = shard.sites
        if out.rows == study.n:
            total[a:b] = part
        else:
            total[a:b] += part * out.rows
    return total


def merge(study: Study, shards: Sequence[Shard], outputs: dict[int, ShardOutput]) -> Result:
    """The Result the local run returns, from every shard's output."""
    missing = [s.describe(study) for s in shards if s.index not in outputs]
    if missing:
        raise ValueError(f"cannot merge: {len(missing)} shard(s) have no output, e.g. {missing[0]}")
    n = study.n
    split_rows = any(outputs[s.index].rows != n for s in shards)
    values = _combine(study, shards, outputs, "values")
    # The baselines of one row block are shared by every site block; take each row block once.
    row_blocks = {s.rows: outputs[s.index] for s in shards}
    if len(row_blocks) == 1:
        (only,) = row_blocks.values()
        clean, corrupt = only.clean, only.corrupt
    else:
        clean = sum(o.clean * o.rows for o in row_blocks.values()) / n
        corrupt = sum(o.corrupt * o.rows for o in row_blocks.values()) / n
    atp = _combine(study, shards, outputs, "atp") if outputs[shards[0].index].atp is not None else None
    if split_rows:
        values = values / n
        atp = None if atp is None else atp / n
        if study.normalize:
            gap = clean - corrupt
            values = values / gap
            atp = None if atp is None else atp / gap
    metadata = dict(outputs[shards[0].index].metadata)  # the method's own keys, in its order
    metadata.update(sites=study.sites_label, normalize=study.normalize, n_prompts=n)
    metadata["baseline"] = {"clean": float(clean), "corrupt": float(corrupt)}
    # Optional libraries are listed when imported: the workers import fewer than the user's process,
    # which a local run would describe. A worker version that differs from this process's is kept.
    workers, here = metadata.get("versions", {}), collect_versions()
    metadata["versions"] = {**workers, **here}
    if any(k in here and here[k] != v for k, v in workers.items()):
        metadata["worker_versions"] = workers
    if "sites_run" in metadata:  # sites not skipped as unchanged: summed over site blocks, the most of any row block
        per_rows: dict[tuple[int, int], int] = {}
        for s in shards:
            per_rows[s.rows] = per_rows.get(s.rows, 0) + int(outputs[s.index].metadata["sites_run"])
        metadata["sites_run"] = max(per_rows.values())
    if atp is not None:
        metadata["atp"] = atp.tolist()
    shape = tuple(len(study.coords[d]) for d in study.dims)
    return Result(values.reshape(shape), study.dims, study.coords, metadata)
