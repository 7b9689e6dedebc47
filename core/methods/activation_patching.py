"""Activation patching: the effect on a metric of patching each site from one run into another."""

from __future__ import annotations

from typing import Any, Callable, Literal, Sequence

import torch
from torch import nn

from ..engine.adapter import Inputs, model_device, repeat_rows
from ..engine.cache import Cache
from ..engine.forward import Bound, Run, execute
from ..engine.interventions import Patch
from ..results.metrics import Metric, MetricContext
from ..engine.model import WrappedModel
from ..progress import progress_bar
from ..engine.resume import resume_chunks
from .shared_prefix import agreeing_positions, capture_sharing_prefix
from .pairs import check_gap, label_positions, prepare_pair, rows_per_forward, same_masks
from ..results.result import Result, collect_versions
from ..sites.site import Site, Span

__all__ = ["activation_patching", "first_differences", "plan_sweep", "source_run"]

# Token rows (prompts x positions computed) a resumed forward holds at most on a CPU when the caller
# gives no batch_size: a matmul's cost per row is lowest from about 64 to 256 rows at GPT-2's widths.
# None: one site per forward (each site's numbers then do not depend on which other sites are swept,
# bit for bit; batched sites round differently, by about 1e-7).
CPU_TOKENS_PER_FORWARD: int | None = 256
# With one prompt, a batch's later sites join its forward at their own block (their rows hold the clean residual
# until then) instead of recomputing the blocks before it (:attr:`~crosspatch.engine.resume.Resume.joins`).
# False: every site of a batch runs from the batch's first block (for measuring what joining saves).
JOIN_ROWS = True


def plan_sweep(m: Any, sites: Sequence[Site], n: int, batch_size: int | None, prefix: Any,
               join: bool = True) -> list[tuple[list[int], Any]]:
    """Batches of ``sites`` (indices into them) and where each resumes, as a sweep of ``n`` prompts runs them.

    On a CPU without a ``batch_size`` a forward over few token rows costs mostly its weights' reads: sites
    that start at the same position share forwards while that is cheaper (``resume_chunks``' cost model),
    up to :data:`CPU_TOKENS_PER_FORWARD` token rows (beyond that a row costs more again: the activations
    leave the cache); with one prompt a site's rows join the batch at its block, holding the clean residual
    there (:data:`JOIN_ROWS`, and ``join``).
    """
    per_forward, tokens, join_at = max(1, rows_per_forward(batch_size, m, n) // n), None, None
    if batch_size is None and prefix is not None and CPU_TOKENS_PER_FORWARD and model_device(m.module).type == "cpu":
        per_forward, tokens = max(1, len(sites)), CPU_TOKENS_PER_FORWARD
        join_at = "resid_pre" if join and JOIN_ROWS and n == 1 and "resid_pre" in m.catalog else None
    return resume_chunks(list(sites), m.catalog, prefix, per_forward, tokens, join_at=join_at)


def activation_patching(
    model: "WrappedModel | nn.Module",
    clean: Any,
    corrupt: Any,
    sites: "str | Site | Sequence[str | Site]",
    metric: "Metric | Callable",
    *,
    direction: Literal["denoising", "noising"] = "denoising",
    normalize: bool = False,
    batch_size: int | None = None,
    reuse_prefix: bool = True,
    skip_unchanged: bool = True,
    progress: bool | None = None,
) -> Result:
    """Patch every site of a sweep, one at a time, and measure the metric's change.

    ``denoising`` runs the corrupt inputs with one clean activation patched in (what restores
    the behaviour?); ``noising`` runs the clean inputs with one corrupt activation patched in
    (what breaks it?). The value is ``metric(patched) - metric(unpatched run)``, averaged over
    prompts; with ``normalize`` it is divided by ``metric(clean) - metric(corrupt)``, so 1 means
    the site alone restores (denoising) the full clean-corrupt gap (a gap of about zero raises, naming
    both baselines, rather than dividing by it).
    Inputs may be text when the model has a tokenizer (``cp.wrap(model, tokenizer=tok)``): a string or
    a list of them each; the metric may name its answers as text (``logit_diff(" Mary", " John")``).
    With a tokenizer the ``pos`` coordinate is labelled with the clean prompt's tokens (``"3 John"``).

    Sites are patched in batches: up to ``batch_size`` rows (sites x prompts) per forward (None: 64
    on an accelerator, one site's prompts on a CPU; :func:`~crosspatch.methods.pairs.rows_per_forward`).
    With ``reuse_prefix`` (and an adapter that can resume), a batch of sites at layer ``L`` and
    position ``p`` starts from the unpatched run's residual at block ``L``, and in causal models
    from its keys and values before ``p`` (:mod:`crosspatch.resume`); the values are the same. On a
    CPU without a ``batch_size``, sites that start at the same position then share forwards where a
    cost model says that is cheaper (:func:`~crosspatch.engine.resume.resume_chunks`), up to
    :data:`CPU_TOKENS_PER_FORWARD` token rows; with one prompt a batch's later sites join its forward at
    their own block (:data:`JOIN_ROWS`), so no block is computed for a site before its own. In a causal
    model the source run computes only the positions from the first one where its inputs differ from the
    base run's.
    With ``skip_unchanged``, a site whose source value equals the base run's (bit for bit, on every
    prompt: in a causal model, every position before the first token where the inputs differ) is
    not run at all: writing the value already there changes nothing, so its effect is exactly 0;
    ``Result.skipped`` marks those sites (plots draw them hatched; ``metadata["sites_run"]`` counts the others).
    A site over every position is patched from the first position where its values differ.
    """
    pair = prepare_pair(model, clean, corrupt, metric, direction)
    m, metric, n, base_in, source_in = pair.model, pair.metric, pair.n, pair.base, pair.source
    sweep = pair.expand(sites)
    # Each site is patched where that costs least: a head's write as its head_z (the write is linear in it).
    patched = [m.catalog.through_source(site) for site in sweep.sites]
    keys = list(dict.fromkeys(site.key for site in patched))

    # The baseline hooks the same sites as the patched runs: some reaches change the numerics
    # slightly (attention patterns need an eager attention), and the difference must not show as an effect.
    # Both runs take the same path (keeping a prefix turns a key/value cache on), or the source run takes the
    # base run's values where their inputs agree, so equal inputs give bit-equal activations and
    # skip_unchanged can trust an exact comparison.
    reuse = reuse_prefix and m.adapter.can_resume(m.module)
    # Every run needs its output only where the metric reads it; the clean output is read where the base
    # run's mask says, so the source run is restricted only when both masks agree.
    mask = base_in.get("attention_mask")
    ctx = MetricContext(torch.arange(n), None, mask)
    at = metric.positions(ctx, pair.sizes)
    source_at = at if same_masks(source_in, base_in) else None
    base = execute(m.module, m.adapter, m.catalog, base_in, capture=keys, keep_prefix=reuse, output_at=at)
    source_out, source_cache = source_run(m, source_in, base_in, base, keys, source_at, reuse)
    clean_out, corrupt_out = (source_out, base.output) if direction == "denoising" else (base.output, source_out)
    ctx.example, ctx.clean = ctx.example.to(clean_out.device), clean_out
    with torch.inference_mode():
        clean_metric, corrupt_metric = metric(clean_out, ctx), metric(corrupt_out, ctx)
    baseline = corrupt_metric if direction == "denoising" else clean_metric
    gap = (clean_metric - corrupt_metric).double().mean()
    if normalize:
        check_gap(float(clean_metric.double().mean()), float(corrupt_metric.double().mean()), metric.name)

    patch = Patch(source_cache)
    effects = torch.zeros(len(sweep), n, dtype=torch.float64, device=baseline.device)
    todo = list(range(len(sweep)))  # sweep indices of the sites to run
    if skip_unchanged and todo:
        causal = base.prefix is not None and base.prefix.causal
        differs = first_differences(m, patched, source_cache, base.cache, causal)
        todo = [i for i in todo if differs[i] is not None]
        # A site over every position writes the base run's own values before its first difference: it is
        # patched from there on (the same values), so a causal run resumes there.
        patched = [site if not differs[i] else site.with_(pos=Span(differs[i], None)) for i, site in enumerate(patched)]
    chunks = plan_sweep(m, [patched[i] for i in todo], n, batch_size, base.prefix)
    bar = progress_bar(range(len(todo)), progress, desc=f"patching {len(todo)} of {len(sweep)} sites", unit="site")
    try:
        for members, resume in chunks:
            members = [todo[j] for j in members]
            inputs = repeat_rows(base_in, len(members))
            bounds = [Bound(patched[i], patch, slice(j * n, (j + 1) * n)) for j, i in enumerate(members)]
            run = execute(m.module, m.adapter, m.catalog, inputs, bounds, resume=resume,
                          output_at=None if at is None else at.repeat(len(members)))
            rows = MetricContext(ctx.example.repeat(len(members)), clean_out, inputs.get("attention_mask"))
            with torch.inference_mode():
                effects[members] = (metric(run.output, rows).view(len(members), n) - baseline).double()
            if hasattr(bar, "update"):  # a progress bar counts sites, not forwards
                bar.update(len(members))
    finally:
        if hasattr(bar, "close"):
            bar.close()
    per_site = effects.mean(dim=1)
    if normalize:
        per_site = per_site / gap
    values = per_site.reshape(sweep.shape).cpu().numpy()
    skipped = torch.ones(len(sweep), dtype=torch.bool)
    skipped[todo] = False

    metadata = {
        "method": "activation_patching",
        "metric": metric.name,
        "sites": str(sites) if isinstance(sites, (str, Site)) else [str(s) for s in sites],
        "direction": direction,
        "normalize": normalize,
        "reuse_prefix": reuse,
        "sites_run": len(todo),
        "n_prompts": n,
        "seed": None,
        "baseline": {
            "clean": float(clean_metric.double().mean()),
            "corrupt": float(corrupt_metric.double().mean()),
        },
        "model": m.describe(),
        "adapter": m.adapter.name,
        "versions": collect_versions(),
    }
    coords = label_positions(dict(sweep.coords), m.position_labels(pair.clean))
    return Result(values, sweep.dims, coords, metadata, skipped.reshape(sweep.shape).numpy())


def source_run(
    m: WrappedModel, source_in: Inputs, base_in: Inputs, base: Run, keys: list[str], output_at: torch.Tensor | None,
    reuse: bool,
) -> tuple[torch.Tensor, Cache]:
    """The source run's output and captures of ``keys``.

    With a kept base prefix in a causal model, and inputs that agree on their first ``p`` positions,
    only positions ``p..`` are computed (the earlier ones are the base run's, bit for bit); otherwise a
    whole run taking the base run's path (a kept prefix turns a key/value cache on), so that equal
    inputs give bit-equal activations for ``skip_unchanged``.
    """
    prefix = base.prefix
    mask = source_in.get("attention_mask")
    if prefix is not None and prefix.causal and all(
        "pos" in m.catalog.family(Site.parse(k).family).axis_names for k in keys
    ) and agreeing_positions(source_in, base_in, prefix.length) > 0:
        output, values, _ = capture_sharing_prefix(m, source_in, keys, output_at, (base_in, prefix, dict(base.cache.items())))
        axes = {k: base.cache.axes[k] for k in keys}
        return output, Cache(values, axes, mask if isinstance(mask, torch.Tensor) else None)
    run = execute(m.module, m.adapter, m.catalog, source_in, capture=keys, keep_prefix=reuse, output_at=output_at)
    return run.output, run.cache


def first_differences(
    m: WrappedModel, sites: list[Site], source: Cache, base: Cache, causal: bool
) -> list[int | None]:
    """Per site, None when its source and base values are equal bit for bit on every prompt; else, for a
    site over every position of a causal model, the first position where they differ, and 0 otherwise.

    One comparison per site, all read back at once: no host-device round trip per site.
    """
    flags = []
    for site in sites:
        diff = source[site] != base[site]
        names = m.catalog.family(site.family).axis_names
        if causal and "pos" in names and "pos" not in site.selection:
            axis = 1 + names.index("pos")
            along = diff.movedim(axis, 0).reshape(diff.shape[axis], -1).any(dim=1)
            flags.append(torch.stack([along.any().long(), along.long().argmax()]))
        else:
            flags.append(torch.stack([diff.any().long(), diff.new_zeros((), dtype=torch.long)]))
    table = torch.stack(flags).tolist() if flags else []
    return [first if any_ else None for any_, first in table]
