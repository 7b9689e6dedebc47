"""Path patching (Wang et al. 2022, the IOI paper): the effect of sender sites on the metric that
travels only through chosen receiver sites.

With ``direction="noising"`` (the paper's convention; base = clean, source = corrupt):

1. run the clean and the corrupt inputs, capturing senders, receivers and the frozen set;
2. run the clean inputs with one sender patched from the corrupt run and every site of ``freeze``
   (default: every head, ``head_out.*[head=*]``) held at its clean value, except the sender and the
   receivers; everything else (MLPs, norms) recomputes. Capture the receivers;
3. run the clean inputs with the receivers patched to the values captured in step 2 and
   everything downstream recomputed. The value is ``metric(step 3) - metric(clean)``, averaged
   over prompts.

``direction="denoising"`` swaps the roles of the two runs (base = corrupt, source = clean).

Receivers are any sites the engine reaches: later ``resid_pre`` / ``resid_mid`` / ``resid_post``
(the residual stream as the receiver), ``head_out`` or ``attn_out`` of later layers, ``mlp_out``,
and a head's query / key / value inputs, ``head_in.l[qkv=r,head=h]`` (where the adapter has them:
the path reaches that head only through that input). A receiver given as a pattern with ``*`` is
swept (one receiver at a time, a dim of the Result); a list of receivers is patched jointly.

Senders and frozen sites should be given at the same granularity (e.g. whole heads): a frozen site
equal to a sender or a receiver is not frozen; partial overlaps are resolved by the sender patch,
which is applied after the freezes.

Cost: 2 capture forwards + ``ceil(senders / per_forward)`` step-2 forwards + step-3 forwards over
``senders x receivers`` row blocks, each batched up to ``batch_size`` rows (None: 64 on an
accelerator, one block per forward on a CPU; :func:`~crosspatch.methods.pairs.rows_per_forward`).
"""

from __future__ import annotations

from typing import Any, Callable, Literal, Sequence

import torch
from torch import nn

from ..engine.adapter import repeat_rows
from ..engine.forward import Bound, execute
from ..engine.interventions import Patch
from ..results.metrics import Metric, MetricContext
from ..engine.model import WrappedModel
from ..progress import progress_bar
from ..results.result import Result, collect_versions
from ..sites.site import Site
from .pairs import check_gap, label_positions, prepare_pair, rows_per_forward

__all__ = ["path_patching"]


def path_patching(
    model: "WrappedModel | nn.Module",
    clean: Any,
    corrupt: Any,
    senders: "str | Site | Sequence[str | Site]",
    receivers: "str | Site | Sequence[str | Site]",
    metric: "Metric | Callable",
    *,
    freeze: "str | Site | Sequence[str | Site] | None" = "head_out.*[head=*]",
    direction: Literal["noising", "denoising"] = "noising",
    normalize: bool = False,
    batch_size: int | None = None,
    progress: bool | None = None,
) -> Result:
    """Path patching of every sender (a sweep) through ``receivers``; see the module docstring.

    Result dims: the senders' sweep dims, then ``receiver`` when ``receivers`` is a swept pattern.
    With ``normalize`` values are divided by ``metric(source) - metric(base)`` (the total effect of
    switching all inputs), so 1 means the path carries the whole effect.
    """
    pair = prepare_pair(model, clean, corrupt, metric, direction)
    m, metric, n, sizes, base_in, source_in = pair.model, pair.metric, pair.n, pair.sizes, pair.base, pair.source
    cat = m.catalog
    sender_sweep = cat.expand(senders, sizes)
    swept = isinstance(receivers, (str, Site)) and cat.resolve(receivers, sizes).is_pattern
    if swept:
        receiver_sets = [[s] for s in cat.expand(receivers, sizes).sites]
    else:
        items = [receivers] if isinstance(receivers, (str, Site)) else list(receivers)
        receiver_sets = [[cat.resolve(r, sizes) for r in items]]
    all_receivers = [r for group in receiver_sets for r in group]
    frozen = list(cat.expand(freeze, sizes).sites) if freeze else []
    receiver_keys = list(dict.fromkeys(r.key for r in all_receivers))
    keys = list(dict.fromkeys([s.key for s in sender_sweep.sites] + receiver_keys + [f.key for f in frozen]))

    base = execute(m.module, m.adapter, cat, base_in, capture=keys)
    source = execute(m.module, m.adapter, cat, source_in, capture=[s.key for s in sender_sweep.sites])
    clean_out = base.output if direction == "noising" else source.output
    ctx = MetricContext(torch.arange(n, device=base.output.device), clean_out, base_in.get("attention_mask"))
    with torch.inference_mode():
        base_metric, source_metric = metric(base.output, ctx), metric(source.output, ctx)
    if normalize:
        check_gap(float(source_metric.double().mean()), float(base_metric.double().mean()), metric.name,
                  ("source", "base"))

    hold, send = Patch(base.cache), Patch(source.cache)
    receiver_set = set(all_receivers)
    n_recv = len(receiver_sets)
    batch_size = rows_per_forward(batch_size, m, n)
    step = max(1, batch_size // (n * n_recv))  # senders per forward: step 3 has senders x receivers blocks
    effects = torch.empty(len(sender_sweep), n_recv, dtype=torch.float64)
    chunks = range(0, len(sender_sweep), step)
    for start in progress_bar(chunks, progress, desc=f"path patching {len(sender_sweep)} senders"):
        chunk = sender_sweep.sites[start : start + step]
        # Step 2: senders from the source run, the frozen set held at the base run, receivers captured.
        inputs = repeat_rows(base_in, len(chunk))
        bounds = []
        for j, sender in enumerate(chunk):
            rows = slice(j * n, (j + 1) * n)
            bounds += [Bound(f, hold, rows) for f in frozen if f != sender and f not in receiver_set]
            bounds.append(Bound(sender, send, rows))
        captured = execute(m.module, m.adapter, cat, inputs, bounds, capture=receiver_keys).cache
        # Step 3: the base run with the receivers patched to their step-2 values, all else recomputed.
        inputs = repeat_rows(base_in, len(chunk) * n_recv)
        bounds = []
        for j in range(len(chunk)):
            patch = Patch(captured.rows(slice(j * n, (j + 1) * n), receiver_keys))  # with its rows' mask
            for r, group in enumerate(receiver_sets):
                block = j * n_recv + r
                bounds += [Bound(site, patch, slice(block * n, (block + 1) * n)) for site in group]
        run = execute(m.module, m.adapter, cat, inputs, bounds)
        rows_ctx = MetricContext(ctx.example.repeat(len(chunk) * n_recv), clean_out, inputs.get("attention_mask"))
        with torch.inference_mode():
            out = metric(run.output, rows_ctx).view(len(chunk), n_recv, n) - base_metric
        effects[start : start + len(chunk)] = out.double().mean(dim=2).cpu()
    total = float((source_metric - base_metric).double().mean())
    if normalize:
        effects = effects / total

    dims, coords = list(sender_sweep.dims), label_positions(dict(sender_sweep.coords), m.position_labels(pair.clean))
    shape = list(sender_sweep.shape)
    if swept:
        dims.append("receiver")
        coords["receiver"] = [str(g[0]) for g in receiver_sets]
        shape.append(n_recv)
    values = effects.reshape(shape).numpy()
    metadata = {
        "method": "path_patching",
        "metric": metric.name,
        "senders": str(senders) if isinstance(senders, (str, Site)) else [str(s) for s in senders],
        "receivers": [[str(s) for s in g] for g in receiver_sets],
        "freeze": None if not freeze else (str(freeze) if isinstance(freeze, (str, Site)) else [str(s) for s in freeze]),
        "direction": direction,
        "normalize": normalize,
        "n_prompts": n,
        "seed": None,
        "total_effect": total,
        "model": m.describe(),
        "adapter": m.adapter.name,
        "versions": collect_versions(),
    }
    return Result(values, tuple(dims), coords, metadata)
