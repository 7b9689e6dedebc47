"""Split a study into independent shards and merge their results back into the one Result a local run
gives.

A shard is a block of the sweep's concrete sites times a block of prompt rows. It runs through the
public method itself (``activation_patching`` or ``attribution_patching``) on those sites and rows:

* site blocks are independent (a site's value never depends on the other sites of a sweep), and a
  block of activation-patching sites starts at a multiple of the sites one forward holds, so each
  forward sees the same rows as in the local run: site-sharded Results are bit-identical (with an explicit
  ``batch_size``; on a CPU without one, sites sharing a start are grouped by a cost model over the sweep
  they are given, so a block rounds in the last float32 bits as its own groups do);
* a block of prompt rows runs with a metric that sees the global prompt index, so per-prompt targets
  (answer tokens) line up, and that keeps what every call returned. From those calls a block sends back
  every prompt's baselines and (activation patching) every prompt's effect on every site, each matched
  to the method's own per-site mean. The merge lays them out as the local run does and takes the same
  float64 means and the same gap (per-prompt effects merged before the mean): it adds no rounding, so
  the Result is bit-identical wherever the model gives each prompt the same numbers in a forward of
  fewer rows. AtP cannot be merged that way from outside (it averages every product over the prompts
  before summing a site's elements, and a block only knows its own average): its blocks are combined
  as prompt-weighted means in a fixed order, and the Result's ``metadata["merge"]`` states the bound.
  AtP*'s GradDrop scores are not linear in the prompts, so GradDrop shards by sites only.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..methods.activation_patching import activation_patching
from ..methods.attribution import attribution_patching
from ..methods.pairs import ACCELERATOR_ROWS, label_positions
from ..results.metrics import Metric, MetricContext
from ..engine.model import WrappedModel
from ..results.result import Result, collect_versions
from ..sites.site import Site

__all__ = ["Study", "Shard", "ShardOutput", "plan_study", "split", "run_shard", "merge", "SHARDABLE", "ROW_MERGE_RTOL"]

#: The merge's own rounding for prompt blocks that could not be merged per prompt (AtP), as
#: ``metadata["merge"]["merge_rtol"]``: each value within this much of the local run's, relative to the
#: largest |value|, when the blocks' numbers are the local run's. It is float64 rounding of the same sums
#: taken in another order, about (prompts + a site's elements) * 2**-53 of the sum of absolute products
#: (measured: below 3e-16 relative); the margin covers products that cancel by up to a factor of 10**3.
ROW_MERGE_RTOL = 1e-12

#: What ``metadata["merge"]["gap"]`` says when a block's per-prompt baselines could not be told apart.
GAP_FROM_MEANS_NOTE = (
    "from the blocks' mean baselines: the local run subtracts each prompt's corrupt metric from its clean one "
    "in the metric's dtype first, so normalised values may differ by up to 2**-24 * mean|clean - corrupt| / |gap| "
    "relative (float32 metrics)"
)

#: What ``metadata["merge"]["forwards"]`` says of a Result merged from prompt blocks.
FORWARDS_NOTE = (
    "each block's forwards hold only its own prompts: the values are the local run's wherever the model's "
    "kernels give a prompt the same numbers in a smaller batch, and differ from them by float32 rounding of "
    "the model's computation where a kernel rounds by batch size"
)

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
    """What a shard sends back: per-site values (a mean over its rows), its baselines, its row count.

    A block of prompt rows also sends every prompt's numbers, so the merge can take the local run's
    means: ``prompt_values`` (activation patching: ``[prompt][site]`` effects), ``prompt_clean`` /
    ``prompt_corrupt`` (the metric's baselines per prompt) and ``metric_dtype`` (the metric's dtype, in
    which the local run subtracts them for the gap). ``skipped``: per site, whether it was skipped as
    unchanged on every prompt of the block."""

    values: list[float]
    clean: float
    corrupt: float
    rows: int
    normalized: bool
    metadata: dict[str, Any] = field(default_factory=dict)
    atp: list[float] | None = None
    prompt_values: list[list[float]] | None = None
    prompt_clean: list[float] | None = None
    prompt_corrupt: list[float] | None = None
    metric_dtype: str | None = None
    skipped: list[bool] | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

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
    sweep = pair.expand(sites)
    label = str(sites) if isinstance(sites, (str, Site)) else [str(s) for s in sites]
    cpu = lambda inputs: {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}  # noqa: E731
    # positions labelled with the clean prompt's tokens, as both methods label them
    coords = label_positions(dict(sweep.coords), pair.model.position_labels(pair.clean))
    return Study(method, cpu(pair.clean), cpu(pair.corrupt), sweep.sites, sweep.dims, coords,
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
    """The study's metric for prompt rows ``[start, start + k)``: it sees global prompt indices. It keeps
    what every call returned (``calls``), from which the merge takes each prompt's baselines."""

    def __init__(self, inner: Metric, start: int, total: int):
        self.inner, self.start, self.total = inner, start, total
        self.calls: list[torch.Tensor] = []

    def __call__(self, output: torch.Tensor, ctx: MetricContext) -> torch.Tensor:
        value = self.inner(output, _GlobalRowContext(ctx, self.start, self.total))
        self.calls.append(value.detach().cpu())
        return value


def _block_metric(study: Study, start: int) -> tuple[Metric, _RowBlockMetric]:
    """The study's metric for a block starting at prompt ``start``, and the recorder inside it. The block
    computes the whole output (no read position): the output layer then multiplies ``rows x positions``
    vectors, a size at which CPU kernels round as in the local run, where a block of one or two prompts
    read at one position takes a small-matrix path that rounds differently."""
    recorder = _RowBlockMetric(study.metric, start, study.n)
    return Metric(study.metric.name, recorder), recorder


def _baselines_per_prompt(recorder: _RowBlockMetric, rows: int, meta: dict[str, Any]) -> tuple[list[float], list[float]] | None:
    """Each prompt's clean and corrupt metric, from the calls of a block run: the two calls of ``rows``
    values whose float64 means are the run's baselines. None when they cannot be told apart."""
    want = meta["baseline"]["clean"], meta["baseline"]["corrupt"]
    found: list[list[float] | None] = [None, None]
    for side in (0, 1):
        matches = {tuple(c.double().tolist()) for c in recorder.calls if c.shape == (rows,) and float(c.double().mean()) == want[side]}
        if len(matches) != 1:
            return None
        found[side] = list(matches.pop())
    return found[0], found[1]  # type: ignore[return-value]


def run_shard(model: WrappedModel, study: Study, shard: Shard) -> ShardOutput:
    """Run one shard through the public method (on the worker that holds ``model``)."""
    (a, b), (r0, r1) = shard.sites, shard.rows
    whole = (r0, r1) == (0, study.n)
    metric, recorder = (study.metric, None) if whole else _block_metric(study, r0)
    quiet = {"progress": False} if study.method == "activation_patching" else {}
    result = SHARDABLE[study.method](
        model, _rows(study.clean, r0, r1, model.device), _rows(study.corrupt, r0, r1, model.device),
        list(study.sites[a:b]), metric, normalize=study.normalize and whole, **quiet, **study.options,
    )
    meta = result.metadata
    atp = meta.get("atp")
    skipped = getattr(result, "skipped", None)
    out = ShardOutput(
        [float(v) for v in result.values.reshape(-1)], meta["baseline"]["clean"], meta["baseline"]["corrupt"],
        r1 - r0, study.normalize and whole, meta, None if atp is None else [float(v) for v in atp],
        skipped=None if skipped is None else [bool(x) for x in np.asarray(skipped).reshape(-1)],
    )
    if recorder is not None and recorder.calls:
        out.metric_dtype = str(recorder.calls[0].dtype)
        found = _baselines_per_prompt(recorder, r1 - r0, meta)
        if found is not None:
            out.prompt_clean, out.prompt_corrupt = found
            if study.method == "activation_patching":
                out.prompt_values = _effects_per_prompt(study, recorder, out)
    return out


def _rows(inputs: dict[str, Any], r0: int, r1: int, device: Any) -> dict[str, Any]:
    return {k: v[r0:r1].to(device) if isinstance(v, torch.Tensor) and v.ndim > 0 else v for k, v in inputs.items()}


def _effects_per_prompt(study: Study, recorder: _RowBlockMetric, out: ShardOutput) -> list[list[float]] | None:
    """Each prompt's effect for every site of an activation-patching block (``[prompt][site]``), from the
    metric's calls: a patched call holds ``k`` rows per site, its effect is ``metric - baseline`` in the
    metric's dtype, as the method computes it. Every site is matched to the one group of rows whose mean
    is the site's value; None when a site matches none or several (the merge then weights the means)."""
    k = out.rows
    dtype = recorder.calls[0].dtype
    clean, corrupt = out.prompt_clean, out.prompt_corrupt
    noising = study.options.get("direction", "denoising") == "noising"
    base = torch.tensor(clean if noising else corrupt, dtype=torch.float64).to(dtype)
    groups: dict[tuple, torch.Tensor] = {}
    for call in recorder.calls:  # the baselines' calls too: effects 0 and the gap, which a site may have
        if call.numel() % k:
            return None
        for rows in call.view(-1, k):
            effect = (rows - base).double()
            groups.setdefault(tuple(effect.tolist()), effect)
    candidates = list(groups.values())
    means = torch.stack(candidates).mean(dim=1).tolist()
    per_site: list[list[float]] = []
    for i, value in enumerate(out.values):
        if out.skipped is not None and out.skipped[i]:
            per_site.append([0.0] * k)
            continue
        match = [c for c, m in zip(candidates, means) if m == value]
        if not match:  # a mean taken over a table of another shape may round in its last bit
            match = [c for c, m in zip(candidates, means) if abs(m - value) <= 1e-12 * abs(value)]
        if len(match) != 1:
            return None
        per_site.append(match[0].tolist())
    return [list(row) for row in zip(*per_site)]


def _weighted(study: Study, shards: Sequence[Shard], outputs: dict[int, ShardOutput], field_name: str) -> np.ndarray:
    """Per-site prompt-weighted means of the row blocks, each site's terms added in row order (math.fsum)."""
    terms: list[list[float]] = [[] for _ in study.sites]
    for shard in sorted(shards, key=lambda s: (s.rows[0], s.sites[0])):
        out = outputs[shard.index]
        a, _ = shard.sites
        for j, v in enumerate(getattr(out, field_name)):
            terms[a + j].append(v * out.rows)
    return np.array([math.fsum(t) / study.n for t in terms], dtype=np.float64)


def _torch_dtype(name: str | None) -> torch.dtype:
    found = getattr(torch, (name or "torch.float32").removeprefix("torch."), None)
    return found if isinstance(found, torch.dtype) else torch.float32


def merge(study: Study, shards: Sequence[Shard], outputs: dict[int, ShardOutput]) -> Result:
    """The Result the local run returns, from every shard's output."""
    missing = [s.describe(study) for s in shards if s.index not in outputs]
    if missing:
        raise ValueError(f"cannot merge: {len(missing)} shard(s) have no output, e.g. {missing[0]}")
    n, n_sites = study.n, len(study.sites)
    first = outputs[shards[0].index]
    # One output per row block (the baselines of a row block are shared by every site block), in row order.
    row_blocks = {s.rows: outputs[s.index] for s in sorted(shards, key=lambda s: s.rows)}
    merge_note: dict[str, Any] | None = None
    atp: np.ndarray | None = None
    if len(row_blocks) == 1:  # site blocks only: every value is the local run's
        (only,) = row_blocks.values()
        values = np.zeros(n_sites)
        atp = None if first.atp is None else np.zeros(n_sites)
        for shard in shards:
            out, (a, b) = outputs[shard.index], shard.sites
            values[a:b] = out.values
            if atp is not None:
                atp[a:b] = out.atp
        clean, corrupt = only.clean, only.corrupt
    else:
        blocks = list(row_blocks.values())
        if all(o.prompt_clean is not None and o.prompt_corrupt is not None for o in blocks):
            # The local run's baselines and gap, from every prompt's metric in prompt order.
            c = torch.tensor([v for o in blocks for v in o.prompt_clean], dtype=torch.float64)  # type: ignore[union-attr]
            d = torch.tensor([v for o in blocks for v in o.prompt_corrupt], dtype=torch.float64)  # type: ignore[union-attr]
            dtype = _torch_dtype(blocks[0].metric_dtype)
            clean, corrupt = float(c.mean()), float(d.mean())
            gap = (c.to(dtype) - d.to(dtype)).double().mean()
            gap_note = "per prompt, as the local run computes it"
        else:  # a block whose baselines could not be told apart: their prompt-weighted means
            clean = math.fsum(o.clean * o.rows for o in blocks) / n
            corrupt = math.fsum(o.corrupt * o.rows for o in blocks) / n
            gap = torch.tensor(clean - corrupt, dtype=torch.float64)
            gap_note = GAP_FROM_MEANS_NOTE
        exact = all(outputs[s.index].prompt_values is not None for s in shards)
        if exact:
            # Per-prompt effects merged before the mean: the local run's [sites, prompts] table and its mean.
            effects = torch.zeros(n_sites, n, dtype=torch.float64)
            for shard in shards:
                (a, b), (r0, r1) = shard.sites, shard.rows
                effects[a:b, r0:r1] = torch.tensor(outputs[shard.index].prompt_values, dtype=torch.float64).T
            per_site = effects.mean(dim=1)
            values = (per_site / gap if study.normalize else per_site).numpy()
        else:
            values = _weighted(study, shards, outputs, "values")
            atp = _weighted(study, shards, outputs, "atp") if first.atp is not None else None
            if study.normalize:
                values, atp = values / float(gap), None if atp is None else atp / float(gap)
        merge_note = {"row_blocks": len(blocks), "merge_rtol": 0.0 if exact else ROW_MERGE_RTOL, "forwards": FORWARDS_NOTE}
        if study.normalize:
            merge_note["gap"] = gap_note
    metadata = dict(first.metadata)  # the method's own keys, in its order
    metadata.update(sites=study.sites_label, normalize=study.normalize, n_prompts=n)
    metadata["baseline"] = {"clean": float(clean), "corrupt": float(corrupt)}
    # Optional libraries are listed when imported: the workers import fewer than the user's process,
    # which a local run would describe. A worker version that differs from this process's is kept.
    workers, here = metadata.get("versions", {}), collect_versions()
    metadata["versions"] = {**workers, **here}
    if any(k in here and here[k] != v for k, v in workers.items()):
        metadata["worker_versions"] = workers
    skipped = _merged_skipped(study, shards, outputs)
    if "sites_run" in metadata:  # sites not skipped as unchanged on every prompt
        if skipped is not None:
            metadata["sites_run"] = int((~skipped).sum())
        else:
            per_rows: dict[tuple[int, int], int] = {}
            for s in shards:
                per_rows[s.rows] = per_rows.get(s.rows, 0) + int(outputs[s.index].metadata["sites_run"])
            metadata["sites_run"] = max(per_rows.values())
    shared = [o.metadata.get("shared_positions") for o in row_blocks.values()]
    if all(isinstance(x, int) for x in shared):  # the positions every prompt shares: the fewest of any block
        metadata["shared_positions"] = min(shared)  # type: ignore[type-var]
    if atp is not None:
        metadata["atp"] = atp.tolist()
    if merge_note is not None:
        metadata["merge"] = merge_note
    shape = tuple(len(study.coords[d]) for d in study.dims)
    return Result(values.reshape(shape), study.dims, study.coords, metadata,
                  None if skipped is None else skipped.reshape(shape))


def _merged_skipped(study: Study, shards: Sequence[Shard], outputs: dict[int, ShardOutput]) -> np.ndarray | None:
    """Per site, skipped in every row block (the local run skips a site equal on every prompt)."""
    if any(outputs[s.index].skipped is None for s in shards):
        return None
    skipped = np.ones(len(study.sites), dtype=bool)
    for shard in shards:
        a, b = shard.sites
        skipped[a:b] &= np.asarray(outputs[shard.index].skipped, dtype=bool)
    return skipped
