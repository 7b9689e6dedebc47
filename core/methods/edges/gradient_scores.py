"""EAP and EAP-IG: every edge scored as ``(ablated_s - clean_s) . d metric / d input_r`` from one forward
with grad and one backward of the clean inputs (taps at every receiver), EAP-IG averaging the receiver
gradients over interpolation steps run as row blocks (``_Interpolate``); ``head_in`` receivers are scored
as the backward makes their per-slot gradients (``_SlotScores`` through a ``_SinkTap``), the others by one
batched matmul over prompts (``_edge_scores``).
"""

from __future__ import annotations

from typing import Any, Callable, Literal

import torch

from ...engine.adapter import repeat_rows
from ...engine.forward import Bound
from ...engine.interventions import Intervention
from ...engine.reach import attach_slot_sink
from ...results.metrics import Metric, MetricContext
from ...results.result import Result
from ...sites.site import Site
from ..attribution import _Tap
from ..pairs import model_metric
from ..shared_prefix import may_share
from .graph import EdgeGraph, _layer, _role, fold_groups
from .patching import Ablation, EdgePatcher
from .result import _flat_index, _result


class _Interpolate(Intervention):
    """Row block ``j`` takes ``base + alpha_j * (target - base)`` (EAP-IG)."""

    kind = "_interpolate"

    def __init__(self, base: torch.Tensor, target: torch.Tensor, alphas: torch.Tensor):
        self.base, self.target, self.alphas = base, target, alphas

    def apply(self, x, ctx):
        n = self.base.shape[0]
        alpha = self.alphas.to(x.device, x.dtype).repeat_interleave(n).view(-1, *([1] * (x.ndim - 1)))
        steps = len(self.alphas)
        base = self.base.to(x.dtype).repeat(steps, *([1] * (x.ndim - 1)))
        target = self.target.to(x.dtype).expand_as(self.base).repeat(steps, *([1] * (x.ndim - 1)))
        # The interpolated value, with the gradient of the sender's own input passed straight through, so
        # receivers upstream of this sender still see the paths that run through it.
        return base + alpha * (target - base) + (x - x.detach())


def _read_window(at: torch.Tensor, start: int, n: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(rows, positions from start, valid)`` of each row's read position ``at``; a row read before ``start``
    (where every sender difference is 0) is marked invalid and read at ``start``."""
    at = at.to(device)
    return torch.arange(n, device=device), (at - start).clamp(min=0), (at >= start)


# The most a head's rows of the output projection, read off the map applied to the identity, may cost as a share of
# the per-head writes' matmul (head_dim / (prompts * pos)) to be read so: measured at d_model 256 x 16 prompts (1/8 -
# 1/16: the write then goes straight into the buffer, 0.17 -> 0.12 FE at T = 32) and at GPT-2 small's 768 x 4
# prompts (1/2 - 2: the probe costs as much as the write; the family's own map and a copy, 0.17 -> 0.09 at T = 16).
PROBE_SHARE = 1 / 8


def _sender_diffs(p: EdgePatcher, clean_senders: dict[str, torch.Tensor], at: torch.Tensor | None = None) -> torch.Tensor:
    """Every sender's ``ablated - clean`` as one sender-major ``[sender, prompt, pos*d]`` buffer, at the positions
    from ``p.shared_positions`` on: before it the ablated run is the clean run, so every difference is exactly 0.
    Sender-major, a receiver's incoming senders (a prefix) over every prompt are one ``[n_in, prompts*pos*d]`` view.
    With ``at`` (each row's read position, when the receivers of the last block's senders, ``p.output_only``,
    are read there alone: :func:`_edge_scores`) those senders' differences are made there, 0 elsewhere.

    A sender read as itself is written into the buffer by one subtraction. Per-head writes read as ``head_z`` are
    written by one batched matmul of the ``z`` differences with each head's rows of the output projection, read
    off the family's map applied to the identity (:meth:`~.patching.EdgePatcher.per_sender_map`), when that costs
    at most an eighth of the write (``PROBE_SHARE``: ``head_dim / (prompts * pos)`` of its matmul); else (GPT-2
    small's width, a few prompts: as much as the write itself) they are the family's own map of the differences
    (:meth:`~.patching.EdgePatcher.writes`, laid out head-major) copied in, a fresh tensor and one more pass."""
    ablated_raw = p.ablated_raw  # the ablated run, which sets the shared positions
    start = p.shared_positions
    sd, row = None, 0
    window = None
    for key in p.keys:
        if at is not None and window is None:
            window = _read_window(at, start, p.n, clean_senders[key].device)
        if window is not None and _layer(key, p.n_layers) == p.n_layers - 1:
            row += _at_read_positions(p, key, clean_senders[key][:, start:], ablated_raw, sd, row, window)
            continue
        clean = clean_senders[key][:, start:]
        ablated = None if ablated_raw is None else ablated_raw[key][:, start:].to(clean.dtype).expand_as(clean)
        n, q = clean.shape[:2]
        mapped = p.reads[key] != key
        one = not mapped and clean.ndim == 3  # one sender read as itself: subtracted straight into the buffer
        with torch.no_grad():
            diff = None if one else (clean.neg() if ablated is None else ablated - clean)  # [n, q, k, e or d]
            per_sender = writes = None
            if mapped and clean.shape[-1] <= PROBE_SHARE * n * q:
                per_sender = p.per_sender_map(key, clean)  # [k, e, d]
            elif mapped:  # per-head writes [n, q, k, d] (a head-major view) of the z differences
                writes = p.writes(key, diff)
            k = 1 if one else clean.shape[2]
            d = clean.shape[-1] if not mapped else (per_sender if writes is None else writes).shape[-1]
            if sd is None:
                sd = clean.new_empty(sum(k for _, k in p.graph.sender_keys), n, q * d)
            out = sd[row : row + k]
            if per_sender is not None:  # [n, q, k, e] -> [k, n*q, e] @ [k, e, d]
                torch.bmm(diff.permute(2, 0, 1, 3).reshape(k, n * q, -1), per_sender, out=out.view(k, n * q, d))
            elif one:  # [n, q, d]
                dest = out.view(n, q, d)
                torch.neg(clean, out=dest) if ablated is None else torch.sub(ablated, clean, out=dest)
            else:  # per-head writes, or per-head values read as themselves: [n, q, k, d]
                out.view(k, n, q, d).copy_((diff if writes is None else writes).permute(2, 0, 1, 3))
        row += k
    return sd


def _at_read_positions(p: EdgePatcher, key: str, clean: torch.Tensor, ablated_raw, sd: torch.Tensor, row: int,
                       window) -> int:
    """Sender ``key``'s differences at each row's read position only (``window``: :func:`_read_window`), written
    into its rows of ``sd`` (zeros elsewhere); returns how many senders it holds."""
    rows, idx, valid = window
    start = p.shared_positions
    n, q = clean.shape[:2]
    with torch.no_grad():
        c = clean[rows, idx]  # [n, (k,) e]
        diff = -c if ablated_raw is None else ablated_raw[key][:, start:].to(c.dtype).expand_as(clean)[rows, idx] - c
        diff = diff * valid.view(-1, *([1] * (diff.ndim - 1))).to(diff.dtype)
        if p.reads[key] != key:  # z differences [n, k, e] -> per-head writes [k, n, d]
            value = p.writes(key, diff.unsqueeze(1))[:, 0].transpose(0, 1)
        else:
            value = diff.unsqueeze(0) if diff.ndim == 2 else diff.transpose(0, 1)
        k, d = value.shape[0], value.shape[-1]
        out = sd[row : row + k].view(k, n, q, d)
        out.zero_()
        out[:, rows, idx] = value
    return k


def _edge_scores(p: EdgePatcher, grads: dict[str, torch.Tensor], sd: torch.Tensor, steps: int,
                 scored: dict[str, torch.Tensor] | None = None, at: torch.Tensor | None = None):
    """``sum_{pos, d} (ablated_s - clean_s) * grad_r`` for every edge, averaged over prompts.

    ``sd`` is :func:`_sender_diffs`. A receiver key in ``scored`` (``[n_in, *slots]``, summed over
    prompts) was scored as the backward made its gradients (:class:`_SlotScores`); any other is one
    batched matmul over prompts of ``[senders, pos*d] @ [pos*d, slots]`` with its gradient read as a
    ``[slot, prompt, pos*d]`` view (``head_in`` gradients arrive slot-major from the reach's backward),
    so nothing ``[.., senders, slots, d]`` is materialised. Under grouped-query attention a key/value head's
    score is the sum over its query heads' slots (:func:`~.graph.fold_groups`); the backward's scorer
    (:class:`_SlotScores`) gets the key/value head's gradient itself. With ``at`` (each row's read position,
    ``sd`` made with it) the receivers in ``p.output_only`` are scored there alone: their gradient is zero elsewhere.
    """
    per_key = []
    window = None if at is None else _read_window(at, p.shared_positions, p.n, sd.device)
    for key, n_in, slots in p.graph.receiver_keys:
        if scored and key in scored:
            total = scored[key]
        elif window is not None and key in p.output_only and not slots:
            rows, idx, valid = window
            d = grads[key].shape[-1]
            picked = sd[:n_in].view(n_in, p.n, -1, d)[:, rows, idx] * valid.view(1, -1, 1).to(sd.dtype)  # [n_in, n, d]
            total = picked.reshape(n_in, -1) @ grads[key][rows, idx + p.shared_positions].to(sd.dtype).reshape(-1, 1)
        else:
            grad = _slots_first(grads[key], p.n, steps, p.shared_positions).to(sd.dtype)  # [slots, n, pos*d]
            total = sd[:n_in].reshape(n_in, -1) @ grad.reshape(grad.shape[0], -1).T  # [n_in, slots]
            if len(slots) == 2:  # head_in: a key/value head's credit is the sum over its query heads' slots
                total = fold_groups(total.view(n_in, *slots), p.graph.kv_group)
        per_key.append(total.double().reshape(-1) / p.n)
    flat = torch.cat(per_key).cpu().numpy()  # one transfer, no per-edge sync
    return flat[_flat_index(p.graph)]


def _slots_first(grad: torch.Tensor, n: int, steps: int, start: int = 0) -> torch.Tensor:
    """A receiver gradient ``[steps*n, pos, *slots, d]`` at positions ``start..`` as ``[slot, n, pos*d]``,
    averaged over steps (a view when the gradient is laid out slot-major, as ``head_in``'s is)."""
    g = grad[:, start:]
    g = g.permute(2, 3, 0, 1, 4) if g.ndim == 5 else g.unsqueeze(0)  # [*slots, rows, pos, d]
    g = g.reshape(-1, steps, n, g.shape[-2] * g.shape[-1])
    return g.mean(dim=1) if steps > 1 else g[:, 0]


class _SlotScores:
    """One ``head_in`` key's edge scores ``[n_in, role, head]`` (summed over prompts), accumulated from its
    per-slot gradients row by row as the backward makes them (:class:`~crosspatch.reach.SlotSink`), so the
    ``[slots, rows, d]`` gradient is never written. ``start`` and ``sd`` are set before the backward. A reach
    hands the gradients of roles ``first_role..`` for every ``head_step``-th head: under grouped-query attention
    a key/value head's own gradient, scored at its group's first slot (as :func:`~.graph.fold_groups` puts it)."""

    def __init__(self, n_in: int, slot_shape: tuple[int, ...]):
        self.n_in, self.slot_shape = n_in, slot_shape
        self.start = 0
        self.sd: torch.Tensor | None = None
        self.scores: torch.Tensor | None = None  # None until the reach hands over gradients

    takes_row_blocks = True  # also called with a slice of rows and their gradients [role, head, rows, pos, d]

    def __call__(self, row: "int | slice", grads: torch.Tensor, first_role: int, head_step: int) -> None:
        r, h = grads.shape[:2]
        sd = self.sd[: self.n_in, row].reshape(self.n_in, -1)  # [n_in, (rows *) pos * d], a view
        part = sd @ grads.to(self.sd.dtype).reshape(r * h, -1).T  # [n_in, r*h], summed over the rows
        if self.scores is None:
            self.scores = part.new_zeros(self.n_in, *self.slot_shape)
        self.scores[:, first_role : first_role + r, ::head_step] += part.view(self.n_in, r, h)


class _SinkTap(_Tap):
    """A tap whose value carries a :class:`_SlotScores` for the reach's backward."""

    def __init__(self, sink: _SlotScores):
        super().__init__()
        self.sink = sink

    def apply(self, x, ctx):
        return attach_slot_sink(super().apply(x, ctx), self.sink)


def _gradient_run(p: EdgePatcher, metric: Metric, extra: list[Bound], steps: int, score: bool = False):
    """One forward with grad over ``steps`` row blocks of the clean inputs, taps at every receiver, one backward.

    Returns ``(grads, clean senders, metric values, sd, scored)``. With ``score`` (one step) the sender
    differences ``sd`` are built between the forward and the backward, and ``head_in`` receivers are
    scored as the backward makes their per-slot gradients (``scored``: the keys whose reach did so;
    their ``grads`` entries are then only right summed over slots). Otherwise ``sd`` is None.
    """
    inputs = repeat_rows(p.clean, steps)
    sinks = {key: _SlotScores(n_in, slots) for key, n_in, slots in p.graph.receiver_keys
             if score and steps == 1 and _role(Site.parse(key).family) == "head_in"}
    taps = {key: _SinkTap(sinks[key]) if key in sinks else _Tap() for key, _, _ in p.graph.receiver_keys}
    bounds = extra + [Bound(Site.parse(k), t) for k, t in taps.items()]
    n = p.n
    ctx = MetricContext(torch.arange(n).repeat(steps), None, inputs.get("attention_mask"))
    keep = steps == 1 and p._ablated_raw is None and p._corrupt is not None and may_share(p.m, p.clean, p._corrupt)
    at = metric.positions(ctx, p.m.adapter.sizes(inputs))
    run, senders = p.senders(inputs, bounds, grad=True, output_at=at, keep_prefix=keep, output_only=p.output_only)
    senders = {k: v[:n] for k, v in senders.items()}
    if steps == 1:  # the corrupt run, made after this one, needs the output_only keys where this run's output is
        p.read_at = at
    if run.prefix is not None:  # ... and starts where the two inputs differ
        p.first = (inputs, run.prefix, {read: run.cache[read].detach() for read in p.read_keys})
        run.prefix = None
    ctx.example = ctx.example.to(run.output.device)
    ctx.clean = p.clean_out if p.clean_out is not None else run.output.detach()[:n]
    values = metric(run.output, ctx)
    sd = None
    if sinks:
        sd = _sender_diffs(p, senders, at)
        for sink in sinks.values():
            sink.start, sink.sd = p.shared_positions, sd
    keys = list(taps)
    grads = torch.autograd.grad(values.sum(), [taps[k].delta for k in keys], allow_unused=True)
    out = {}
    for k, gr in zip(keys, grads):
        out[k] = torch.zeros_like(taps[k].delta) if gr is None else gr
    scored = {k: sink.scores for k, sink in sinks.items() if sink.scores is not None}
    return out, senders, values.detach()[:n], sd, scored


def eap(
    model, clean, corrupt, metric: "Metric | Callable", *, ablation: Ablation = "resample", reference: Any = None,
    graph: EdgeGraph | None = None,
) -> Result:
    """Edge attribution patching: ``(ablated_s - clean_s) . d metric / d input_r`` on the clean run, every edge.

    Cost: one forward with grad and one backward of the clean inputs, then one capture forward of the
    ablation source (none for ``zero``; for ``resample`` in a causal model only from the first position
    where clean and corrupt differ, :mod:`~crosspatch.methods.shared_prefix`, ``metadata["shared_positions"]``).
    """
    p = EdgePatcher(model, clean, corrupt, ablation, reference, graph)
    metric = model_metric(p.m, metric)  # text answers through the model's tokenizer
    p.clean_out = None
    grads, _, _, sd, scored = _gradient_run(p, metric, [], 1, score=True)
    return _result(p, _edge_scores(p, grads, sd, 1, scored, p.read_at), "eap", metric, {"backwards": 1})


def eap_ig(
    model, clean, corrupt, metric: "Metric | Callable", *, steps: int = 5, variant: Literal["inputs", "activations"] = "inputs",
    ablation: Ablation = "resample", reference: Any = None, graph: EdgeGraph | None = None,
) -> Result:
    """EAP with integrated gradients: the receiver gradients averaged over ``steps`` points
    ``alpha = k / steps`` (``k = 0 .. steps-1``) between the clean and the ablated run.

    ``variant="inputs"``: the embeddings (``embed``) are interpolated; ``"activations"``: every
    sender output is interpolated at once. All steps are row blocks of one forward with grad; one backward.
    """
    if variant not in ("inputs", "activations"):
        raise ValueError(f"variant must be 'inputs' or 'activations', got {variant!r}")
    p = EdgePatcher(model, clean, corrupt, ablation, reference, graph)
    metric = model_metric(p.m, metric)  # text answers through the model's tokenizer
    ctx = MetricContext(torch.arange(p.n), None, p.clean.get("attention_mask"))
    clean_run, senders = p.senders(p.clean, output_at=metric.positions(ctx, p.m.adapter.sizes(p.clean)))
    p.clean_out = clean_run.output
    alphas = torch.arange(steps, dtype=torch.float64) / steps
    keys = [p.keys[0]] if variant == "inputs" else p.keys  # the first sender is the embeddings
    extra = []
    for key in keys:
        base = p.writes(key, senders[key])
        target = p.ablated_for(key, 1, base)
        extra.append(Bound(Site.parse(key), _Interpolate(base.clone(), target.clone(), alphas)))
    grads = _gradient_run(p, metric, extra, steps)[0]
    return _result(p, _edge_scores(p, grads, _sender_diffs(p, senders), steps), "eap_ig", metric,
                   {"backwards": 1, "steps": steps, "variant": variant})
