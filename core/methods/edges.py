"""Edge graphs of residual models: exact edge patching in one forward, EAP, EAP-IG and ACDC.

Senders write into the residual stream: ``embed``, ``head_out.l[head=h]``, ``mlp_out.l``.
Receivers read it: ``head_in.l[qkv=r,head=h]`` (query, key and value separately), ``mlp_in.l``,
``logits_in``. There is an edge from every sender to every receiver after it (a pre-LN block with
attention before the MLP: ``head_out.l`` feeds ``mlp_in.l`` and everything in later layers).
Only the catalog is used, so any adapter with these six families gets the methods.

**Convention** (``activation_patching(direction="noising")``): the base run is *clean*; a patched
(``mask = 1``) edge ``s -> r`` carries the *ablated* value of ``s`` (the corrupt run's for
``ablation="resample"``, zero, or the reference mean) instead of ``s``'s value in this run::

    input_r = input_r(this run) + sum_s mask[s -> r] * (ablated_s - s(this run))

So all edges patched gives the corrupt run (resample), no edges the clean run, and an unpatched
edge carries the sender's value in *this* run, which already holds the effect of patched edges
upstream (path semantics, as auto-circuit and ACDC). All mask variants of a call run as row blocks
of one forward.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Sequence

import numpy as np
import torch
from torch import nn

from ..engine.adapter import batch_size as rows_of, repeat_rows
from ..engine.forward import Bound, execute
from ..engine.interventions import Intervention
from ..results.metrics import Metric, MetricContext, as_metric, kl_to_clean
from ..engine.model import WrappedModel, wrap
from ..results.result import Result, collect_versions
from ..engine.reach import attach_slot_sink
from ..engine.resume import Prefix, Resume
from ..sites.site import Site, split_tower
from .attribution import _read_key, _Tap
from .edge_paths import connected
from .shared_prefix import capture_sharing_prefix, may_share

__all__ = ["EdgeGraph", "edge_graph", "patch_edges", "eap", "eap_ig", "acdc"]

Ablation = Literal["resample", "zero", "mean"]
NEEDED = ("embed", "head_out", "mlp_out", "head_in", "mlp_in", "logits_in")


@dataclass
class EdgeGraph:
    """Senders, receivers and edges, each in topological order, plus the index maps the methods use."""

    senders: list[str]  # node names, e.g. "embed", "head_out.0[head=1]", "mlp_out.0"
    receivers: list[str]  # "head_in.1[qkv=0,head=2]", "mlp_in.0", "logits_in"
    edges: list[tuple[int, int]]  # (sender index, receiver index)
    sender_keys: list[tuple[str, int]]  # (site key, number of senders in it), in firing order
    receiver_keys: list[tuple[str, int, tuple[int, ...]]]  # (site key, incoming senders = a prefix, slot shape)
    receiver_of: list[tuple[int, tuple[int, ...]]] = field(default_factory=list)  # receiver -> (key index, slot)
    tower: str = ""  # the family prefix of a two-tower model's tower ("vision."), else ""

    @property
    def nodes(self) -> list[str]:
        """Every node once, in topological order (receivers before the senders of the same stage)."""
        return [n for _, n in sorted(self._staged(), key=lambda item: item[0])]

    def _staged(self):
        for i, s in enumerate(self.senders):
            yield (self._stage(s), 1, i), s
        for i, r in enumerate(self.receivers):
            yield (self._stage(r), 0, i), r

    @staticmethod
    def _stage(name: str) -> int:
        site = Site.parse(name)
        role = _role(site.family)
        if role == "embed":
            return 0
        if role == "logits_in":
            return 1 << 30
        return 2 * int(site.layer) + (1 if role in ("head_out", "head_in") else 2)

    @property
    def edge_names(self) -> list[str]:
        return [f"{self.senders[s]}->{self.receivers[r]}" for s, r in self.edges]

    def __len__(self) -> int:
        return len(self.edges)

    def index(self, name: str) -> int:
        """The index of an edge ``"sender->receiver"``."""
        return self.edge_names.index(name)

    def mask(self, names: Sequence[str] = ()) -> torch.Tensor:
        """A ``[n_edges]`` mask with the named edges set."""
        m = torch.zeros(len(self.edges))
        for name in names:
            m[self.index(name)] = 1
        return m


def edge_graph(model: "WrappedModel | nn.Module", tower: str | None = None) -> EdgeGraph:
    """The edge graph of a model whose catalog has embed, head_out, mlp_out, head_in, mlp_in and logits_in;
    for a two-tower model, of one ``tower`` (``"vision"``: the families ``vision.embed``, ...)."""
    m = wrap(model)
    t = f"{tower}." if tower else ""
    missing = [t + f for f in NEEDED if t + f not in m.catalog]
    if missing:
        towers = sorted(t[:-1] for t, role in map(split_tower, m.catalog.families) if t and role == "head_out")
        hint = f"; its towers: {', '.join(towers)} (pass tower=...)" if towers and not tower else ""
        raise ValueError(
            f"an edge graph needs the site families {', '.join(t + f for f in NEEDED)}; {m.catalog.model_name} lacks "
            f"{', '.join(missing)} (the transformers adapter adds head_in / mlp_in / logits_in for pre-LN models){hint}"
        )
    n_layers = m.catalog.family(t + "head_out").layers
    n_heads = m.catalog.family(t + "head_out").axis("head").size
    senders, sender_keys = [t + "embed"], [(t + "embed", 1)]
    receivers: list[str] = []
    receiver_keys: list[tuple[str, int, tuple[int, ...]]] = []
    receiver_of: list[tuple[int, tuple[int, ...]]] = []
    edges: list[tuple[int, int]] = []

    def add_receivers(key: str, names_slots: list[tuple[str, tuple[int, ...]]], slot_shape: tuple[int, ...]):
        k = len(receiver_keys)
        receiver_keys.append((key, len(senders), slot_shape))
        for name, slot in names_slots:
            receiver_of.append((k, slot))
            r = len(receivers)
            receivers.append(name)
            edges.extend((s, r) for s in range(len(senders)))

    for layer in range(n_layers):
        add_receivers(
            f"{t}head_in.{layer}",
            [(f"{t}head_in.{layer}[qkv={q},head={h}]", (q, h)) for q in range(3) for h in range(n_heads)],
            (3, n_heads),
        )
        senders += [f"{t}head_out.{layer}[head={h}]" for h in range(n_heads)]
        sender_keys.append((f"{t}head_out.{layer}", n_heads))
        add_receivers(f"{t}mlp_in.{layer}", [(f"{t}mlp_in.{layer}", ())], ())
        senders.append(f"{t}mlp_out.{layer}")
        sender_keys.append((f"{t}mlp_out.{layer}", 1))
    add_receivers(f"{t}logits_in", [(f"{t}logits_in", ())], ())
    edges.sort(key=lambda e: (EdgeGraph._stage(receivers[e[1]]), e[1], e[0]))
    return EdgeGraph(senders, receivers, edges, sender_keys, receiver_keys, receiver_of, t)


def _role(family: str) -> str:
    return split_tower(family)[1]


def _as_senders(value: torch.Tensor, key: str) -> torch.Tensor:
    """A sender activation as ``[rows, pos, k, d]`` (head_out already is)."""
    return value if _role(Site.parse(key).family) == "head_out" else value.unsqueeze(2)


class _State:
    """One forward's sender differences ``ablated - current``, appended as the senders fire."""

    def __init__(self):
        self.diffs: list[torch.Tensor] = []


class _Sender(Intervention):
    kind = "_edge_sender"

    def __init__(self, state: _State, key: str, ablated: torch.Tensor | None):
        self.state, self.key, self.ablated = state, key, ablated

    def apply(self, x, ctx):
        if self.ablated is not None:
            ablated = self.ablated.to(x.dtype).expand_as(x) if self.ablated.shape[0] == 1 else self.ablated.to(x.dtype)
            self.state.diffs.append(_as_senders(ablated - x, self.key))
        return x


class _Receiver(Intervention):
    kind = "_edge_receiver"

    def __init__(self, state: _State, n_in: int, mask: torch.Tensor, rows_per_mask: int):
        self.state, self.n_in, self.mask, self.rows = state, n_in, mask, rows_per_mask  # mask [k, n_in, *slots]

    def apply(self, x, ctx):
        diffs = torch.cat(self.state.diffs, dim=2)
        if diffs.shape[2] != self.n_in:
            raise RuntimeError(f"edge patching at {ctx.site}: {diffs.shape[2]} senders fired, expected {self.n_in}")
        rows = self.mask.shape[0] * self.rows
        if diffs.shape[:2] != x.shape[:2] or x.shape[0] != rows:
            raise ValueError(
                f"edge patching at {ctx.site}: its activation has {x.shape[0]} rows, the run {rows}; with a two-tower "
                f"model the graph's tower must be the one whose inputs are the rows"
            )
        mask = self.mask.to(device=x.device, dtype=x.dtype).repeat_interleave(self.rows, dim=0)
        if x.ndim == 5:  # head_in [rows, pos, 3, head, d]
            return x + torch.einsum("bpsd,bsrh->bprhd", diffs, mask)
        return x + torch.einsum("bpsd,bs->bpd", diffs, mask)


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


class _Patcher:
    """Clean inputs, ablated sender values and the graph: runs any stack of edge masks in one forward."""

    def __init__(self, model, clean, corrupt, ablation: Ablation, reference, graph: EdgeGraph | None):
        if ablation not in ("resample", "zero", "mean"):
            raise ValueError(f"ablation must be 'resample', 'zero' or 'mean', got {ablation!r}")
        self.m = m = wrap(model)
        self.graph = graph or edge_graph(m)
        self.clean = m.prepare(clean)
        self.n = rows_of(self.clean)
        self.keys = [k for k, _ in self.graph.sender_keys]
        self.n_layers = m.catalog.family(self.graph.tower + "head_out").layers
        # What a run captures for each sender: a family that is a linear map of another (head_out of
        # head_z) is read as its source and mapped afterwards, so no forward builds per-head writes for it.
        self.reads = {k: _read_key(m.catalog, k, [Site.parse(k)]) for k in self.keys}
        self.read_keys = list(dict.fromkeys(self.reads.values()))  # what a run captures, once each
        self.ablation = ablation
        self.forwards = 0
        self.clean_out: torch.Tensor | None = None
        self._ablated: dict[str, torch.Tensor] | None = None
        self._ablated_raw: dict[str, torch.Tensor] | None = None
        self._corrupt = None
        # A clean run's (inputs, prefix, senders as read), kept for the corrupt run to start where the inputs
        # differ, and the positions that run computed its output at (its gradients are zero elsewhere).
        self.first: tuple | None = None
        self.first_at: torch.Tensor | None = None
        # The last MLP's write reaches only logits_in: where both are used only through logits_in's gradient,
        # which is zero away from the positions the metric reads, the model may compute them at those alone.
        self.output_only = (f"{self.graph.tower}mlp_out.{self.n_layers - 1}", f"{self.graph.tower}logits_in")
        self.shared_positions = 0
        if ablation == "resample":
            if corrupt is None:
                raise ValueError("ablation='resample' needs the corrupt inputs")
            self._corrupt = m.prepare(corrupt)
        elif ablation == "mean":
            ref = m.prepare(reference if reference is not None else clean)
            self._ablated_raw = {k: v.mean(dim=0, keepdim=True) for k, v in self.senders(ref)[1].items()}

    @property
    def ablated_raw(self) -> dict[str, torch.Tensor] | None:
        """The ablated senders as read (head_z for heads), None for zero ablation; ``ablated`` holds them as the
        senders' own values. The corrupt run is made on first use, from the positions it shares with
        ``first`` when a clean run kept one (:mod:`.shared_prefix`)."""
        if self._ablated_raw is None and self._corrupt is not None:
            if self.first is not None and self.first_at is not None:  # values for that run's gradients only
                at, only = self.first_at, self.output_only
            else:  # the output is not read
                at, only = torch.full((self.n,), self.m.adapter.sizes(self._corrupt).get("pos", 1) - 1), ()
            _, values, self.shared_positions = capture_sharing_prefix(self.m, self._corrupt, self.read_keys, at, self.first, only)
            self.forwards += 1
            self.first = self.first_at = None
            self._ablated_raw = {key: values[read].detach() for key, read in self.reads.items()}
        return self._ablated_raw

    @property
    def ablated(self) -> dict[str, torch.Tensor] | None:
        """Per sender key, its ablated value (``[1 or n, ...]`` as the sender's family), or None for zero ablation."""
        if self._ablated is None and self.ablated_raw is not None:
            self._ablated = {k: self.writes(k, v) for k, v in self.ablated_raw.items()}
        return self._ablated

    @ablated.setter
    def ablated(self, values: dict[str, torch.Tensor]) -> None:
        self._ablated = values

    def _execute(self, inputs, bounds=(), capture=(), grad=False, output_at=None, **kwargs):
        self.forwards += 1
        return execute(self.m.module, self.m.adapter, self.m.catalog, inputs, bounds, capture, grad=grad,
                       output_at=output_at, **kwargs)

    def senders(self, inputs, bounds=(), grad=False, output_at="unread", keep_prefix=False, output_only=()):
        """A run of ``inputs`` and every sender's value in it as read (detached; :meth:`writes` maps it to the
        sender's own value).

        ``output_at``: the positions the caller reads the output at (``[rows]``), None for all of them;
        by default the output is not read, so it is computed at position 0 only where the adapter can.
        ``output_only``: as for :func:`~crosspatch.engine.execute`."""
        if isinstance(output_at, str):
            output_at = torch.zeros(rows_of(inputs), dtype=torch.long)
        run = self._execute(inputs, bounds, self.read_keys, grad, output_at, keep_prefix=keep_prefix, output_only=output_only)
        return run, {key: run.cache[read].detach() for key, read in self.reads.items()}

    def writes(self, key: str, raw: torch.Tensor) -> torch.Tensor:
        """Sender ``key``'s own value (``[rows, pos, head, d]`` for heads) from its value as read."""
        if self.reads[key] == key:
            return raw
        site = Site.parse(key)
        return self.m.catalog.family(site.family).linear_from.apply(raw, site.layer)

    def sender_diff(self, key: str, clean_raw: torch.Tensor, start: int = 0) -> torch.Tensor:
        """``ablated - clean`` for sender ``key`` as ``[rows, pos, k, d]`` at positions ``start..``, from its clean
        value as read (the difference is taken before the linear map, which then runs once)."""
        clean_raw = clean_raw[:, start:]
        ablated = 0 if self.ablated_raw is None else self.ablated_raw[key][:, start:].to(clean_raw.dtype).expand_as(clean_raw)
        with torch.no_grad():
            return _as_senders(self.writes(key, ablated - clean_raw), key)

    def ablated_for(self, key: str, reps: int, like: torch.Tensor | None = None) -> torch.Tensor:
        if self.ablated is None:
            return torch.zeros(1, *like.shape[1:], dtype=like.dtype, device=like.device)
        a = self.ablated[key]
        return a if a.shape[0] == 1 or reps == 1 else a.repeat(reps, *([1] * (a.ndim - 1)))

    def dense(self, masks: torch.Tensor) -> list[torch.Tensor]:
        """Flat ``[k, n_edges]`` masks as one ``[k, n_in, *slots]`` tensor per receiver key."""
        g = self.graph
        out = [torch.zeros(masks.shape[0], n_in, *slots) for _, n_in, slots in g.receiver_keys]
        for e, (s, r) in enumerate(g.edges):
            k, slot = g.receiver_of[r]
            out[k][(slice(None), s, *slot)] = masks[:, e]
        return out

    def keep_clean(self, output_at: torch.Tensor | None) -> "_CleanPrefix | None":
        """One clean run kept so that :meth:`run` can start at the first block a mask patches (None when
        the adapter cannot resume); its output is ``clean_out``."""
        m = self.m
        if not m.adapter.can_resume(m.module):
            self.clean_out = self._execute(self.clean, output_at=output_at).output
            return None
        run, values = self.senders(self.clean, output_at=output_at, keep_prefix=True)
        self.clean_out = run.output
        # what a sender before the start adds: ablated - clean
        return _CleanPrefix(run.prefix, {key: self.sender_diff(key, value) for key, value in values.items()})

    def _start(self, dense: list[torch.Tensor]) -> int:
        """The first block whose receivers any mask patches (the last block when only the logits' input is)."""
        n_layers = self.n_layers
        touched = [_layer(key, n_layers) for (key, _, _), d in zip(self.graph.receiver_keys, dense) if bool(d.any())]
        return min(touched + [n_layers - 1], default=n_layers - 1)

    def run(self, masks: torch.Tensor, output_at: torch.Tensor | None = None, clean: "_CleanPrefix | None" = None):
        """The clean inputs once per mask row (row blocks), the masked edges patched. With ``clean``
        (:meth:`keep_clean`) the run starts at the first block a mask patches: before it every value is
        the clean run's, so the senders there add their ``ablated - clean`` as constants."""
        masks = torch.as_tensor(masks, dtype=torch.float32)
        masks = masks.unsqueeze(0) if masks.ndim == 1 else masks
        if masks.shape[1] != len(self.graph):
            raise ValueError(f"an edge mask has {len(self.graph)} entries (one per edge), got {masks.shape[1]}")
        k = masks.shape[0]
        inputs = repeat_rows(self.clean, k)
        dense = self.dense(masks)
        n_layers = self.n_layers
        start = self._start(dense) if clean is not None else 0
        resume = Resume(clean.prefix, start) if start > 0 else None
        state = _State()
        bounds = []
        for key in self.keys:
            if resume is not None and _layer(key, n_layers) < start:
                state.diffs.append(clean.diffs[key].repeat(k, *([1] * (clean.diffs[key].ndim - 1))))
                continue
            abl = None if self.ablated is None else self.ablated_for(key, k)
            bounds.append(Bound(Site.parse(key), _Sender(state, key, abl) if abl is not None else _ZeroSender(state, key)))
        for (key, n_in, _), d in zip(self.graph.receiver_keys, dense):
            if resume is None or _layer(key, n_layers) >= start:  # the others are before the start and unpatched
                bounds.append(Bound(Site.parse(key), _Receiver(state, n_in, d, self.n)))
        return self._execute(inputs, bounds, output_at=output_at, resume=resume).output


@dataclass
class _CleanPrefix:
    prefix: Prefix
    diffs: dict[str, torch.Tensor]  # per sender key, ablated - clean, [n, pos, k, d]


def _layer(key: str, n_layers: int) -> int:
    """The block a sender or receiver key belongs to: -1 for the embeddings, ``n_layers`` for the logits' input."""
    site = Site.parse(key)
    return site.layer if isinstance(site.layer, int) else (-1 if _role(site.family) == "embed" else n_layers)


class _ZeroSender(_Sender):
    def __init__(self, state, key):
        super().__init__(state, key, None)

    def apply(self, x, ctx):
        self.state.diffs.append(_as_senders(-x, self.key))
        return x


def patch_edges(
    model: "WrappedModel | nn.Module",
    clean: Any,
    corrupt: Any,
    edge_mask: "torch.Tensor | Sequence[float]",
    *,
    ablation: Ablation = "resample",
    reference: Any = None,
    graph: EdgeGraph | None = None,
) -> torch.Tensor:
    """The output of the clean run with the masked edges patched (see the module docstring).

    ``edge_mask`` is ``[n_edges]`` or ``[k, n_edges]`` (``k`` variants as row blocks of one forward;
    output rows ``j * n : (j + 1) * n`` belong to mask ``j``).
    """
    return _Patcher(model, clean, corrupt, ablation, reference, graph).run(edge_mask)


def _sender_diffs(p: _Patcher, clean_senders: dict[str, torch.Tensor]) -> torch.Tensor:
    """Every sender's ``ablated - clean`` as one ``[prompt, sender, pos*d]`` buffer, at the positions from
    ``p.shared_positions`` on: before it the ablated run is the clean run, so every difference is exactly 0."""
    p.ablated_raw  # noqa: B018 (the ablated run, which sets the shared positions)
    sd, row = None, 0
    for key in p.keys:
        diff = p.sender_diff(key, clean_senders[key], p.shared_positions)  # [n, pos, k, d]
        n, pos, k, d = diff.shape
        if sd is None:
            sd = diff.new_empty(n, sum(k for _, k in p.graph.sender_keys), pos * d)
        sd[:, row : row + k].view(n, k, pos, d).copy_(diff.transpose(1, 2))
        row += k
    return sd


def _edge_scores(p: _Patcher, grads: dict[str, torch.Tensor], sd: torch.Tensor, steps: int,
                 scored: dict[str, torch.Tensor] | None = None):
    """``sum_{pos, d} (ablated_s - clean_s) * grad_r`` for every edge, averaged over prompts.

    ``sd`` is :func:`_sender_diffs`. A receiver key in ``scored`` (``[n_in, *slots]``, summed over
    prompts) was scored as the backward made its gradients (:class:`_SlotScores`); any other is one
    batched matmul over prompts of ``[senders, pos*d] @ [pos*d, slots]`` with its gradient read as a
    ``[slot, prompt, pos*d]`` view (``head_in`` gradients arrive slot-major from the reach's backward),
    so nothing ``[.., senders, slots, d]`` is materialised.
    """
    per_key = []
    for key, n_in, slots in p.graph.receiver_keys:
        if scored and key in scored:
            total = scored[key]
        else:
            grad = _slots_first(grads[key], p.n, steps, p.shared_positions).to(sd.dtype)  # [slots, n, pos*d]
            total = torch.bmm(sd[:, :n_in], grad.permute(1, 2, 0)).sum(0)  # [n_in, slots]
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
    ``[slots, rows, d]`` gradient is never written. ``start`` and ``sd`` are set before the backward."""

    def __init__(self, n_in: int, slot_shape: tuple[int, ...]):
        self.n_in, self.slot_shape = n_in, slot_shape
        self.start = 0
        self.sd: torch.Tensor | None = None
        self.scores: torch.Tensor | None = None  # None until the reach hands over gradients

    def __call__(self, row: int, grads: torch.Tensor, first_role: int, head_step: int) -> None:
        r, h = grads.shape[:2]
        part = self.sd[row, : self.n_in] @ grads.to(self.sd.dtype).reshape(r * h, -1).T  # [n_in, r*h]
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


def _flat_index(g: EdgeGraph) -> np.ndarray:
    """Per edge, its position in the concatenated per-receiver-key ``[n_in, *slots]`` tensors."""
    if getattr(g, "_flat", None) is None:
        offsets = np.cumsum([0] + [n_in * int(np.prod(slots, dtype=int)) for _, n_in, slots in g.receiver_keys])
        index = np.empty(len(g.edges), dtype=np.int64)
        for e, (s, r) in enumerate(g.edges):
            k, slot = g.receiver_of[r]
            _, n_in, slots = g.receiver_keys[k]
            index[e] = offsets[k] + np.ravel_multi_index((s, *slot), (n_in, *slots))
        g._flat = index
    return g._flat


def _gradient_run(p: _Patcher, metric: Metric, extra: list[Bound], steps: int, score: bool = False):
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
    if run.prefix is not None:  # the corrupt run, made after this one, starts where the two inputs differ
        p.first = (inputs, run.prefix, {read: run.cache[read].detach() for read in p.read_keys})
        p.first_at = at
        run.prefix = None
    ctx.example = ctx.example.to(run.output.device)
    ctx.clean = p.clean_out if p.clean_out is not None else run.output.detach()[:n]
    values = metric(run.output, ctx)
    sd = None
    if sinks:
        sd = _sender_diffs(p, senders)
        for sink in sinks.values():
            sink.start, sink.sd = p.shared_positions, sd
    keys = list(taps)
    grads = torch.autograd.grad(values.sum(), [taps[k].delta for k in keys], allow_unused=True)
    out = {}
    for k, gr in zip(keys, grads):
        out[k] = torch.zeros_like(taps[k].delta) if gr is None else gr
    scored = {k: sink.scores for k, sink in sinks.items() if sink.scores is not None}
    return out, senders, values.detach()[:n], sd, scored


def _result(p: _Patcher, scores, method: str, metric: Metric, extra: dict) -> Result:
    metadata = {
        "method": method,
        "metric": metric.name,
        "ablation": p.ablation,
        "convention": "noising: clean base, patched edges carry the ablated sender value",
        "n_prompts": p.n,
        "n_edges": len(p.graph),
        "forwards": p.forwards,
        "shared_positions": p.shared_positions,
        "seed": None,
        **extra,
        "model": p.m.describe(),
        "adapter": p.m.adapter.name,
        "versions": collect_versions(),
    }
    return Result(np.asarray(scores, dtype=float), ("edge",), {"edge": p.graph.edge_names}, metadata)


def eap(
    model, clean, corrupt, metric: "Metric | Callable", *, ablation: Ablation = "resample", reference: Any = None,
    graph: EdgeGraph | None = None,
) -> Result:
    """Edge attribution patching: ``(ablated_s - clean_s) . d metric / d input_r`` on the clean run, every edge.

    Cost: one forward with grad and one backward of the clean inputs, then one capture forward of the
    ablation source (none for ``zero``; for ``resample`` in a causal model only from the first position
    where clean and corrupt differ, :mod:`.shared_prefix`, ``metadata["shared_positions"]``).
    """
    metric = as_metric(metric)
    p = _Patcher(model, clean, corrupt, ablation, reference, graph)
    p.clean_out = None
    grads, _, _, sd, scored = _gradient_run(p, metric, [], 1, score=True)
    return _result(p, _edge_scores(p, grads, sd, 1, scored), "eap", metric, {"backwards": 1})


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
    metric = as_metric(metric)
    p = _Patcher(model, clean, corrupt, ablation, reference, graph)
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


def acdc(
    model, clean, corrupt, metric: "Metric | Callable | None" = None, *, threshold: float, ablation: Ablation = "resample",
    reference: Any = None, change: Literal["increase", "abs"] | None = None, batch_size: int = 64,
    graph: EdgeGraph | None = None, prune: bool = True, reuse_prefix: bool = True,
) -> Result:
    """ACDC (Conmy et al. 2023): over receivers in reverse topological order, and their incoming edges
    from the latest sender back, remove (patch) an edge when that changes the metric by less than
    ``threshold``; removals stick. The metric defaults to ``kl_to_clean()`` with ``change="increase"``
    (a removal that lowers the KL is always taken); any other metric uses ``change="abs"``.

    Batched, with the result of the sequential greedy algorithm: a round evaluates every remaining
    candidate of the receiver alone (row blocks of one forward, up to ``batch_size`` rows each); from
    the first acceptable one ``i`` a second forward evaluates the running removals ``todo[i]``,
    ``todo[i:i+2]``, ...; they are accepted while each step stays under the threshold, the first
    failure is rejected, and the next round starts after it. A receiver whose edges all go costs two
    forwards; one whose edges all stay costs one.
    ``prune`` (default): after the greedy pass, kept edges off every input-to-output path of kept edges
    (a sender nothing kept feeds, a receiver whose node reaches no kept edge onward) are removed too
    (:func:`~crosspatch.methods.edge_paths.connected`), and the final metric is re-measured (one forward).
    ``reuse_prefix`` (default, where the adapter can resume): every patched run starts from the clean
    run's residual at the first block whose receivers it patches (in reverse topological order that is
    the current receiver's block); the numbers are the same.
    The Result holds 1 for every edge kept in the circuit, 0 for removed ones.
    """
    change = change or ("increase" if metric is None else "abs")
    metric = as_metric(metric if metric is not None else kl_to_clean())
    p = _Patcher(model, clean, corrupt, ablation, reference, graph)
    n, g = p.n, p.graph
    sizes = p.m.adapter.sizes(p.clean)
    at = metric.positions(MetricContext(torch.arange(n)), sizes)
    if reuse_prefix:
        kept = p.keep_clean(at)  # also sets p.clean_out
    else:
        kept, p.clean_out = None, p._execute(p.clean, output_at=at).output
    clean_out = p.clean_out

    def evaluate(masks: torch.Tensor) -> torch.Tensor:
        out = []
        per = max(1, batch_size // n)
        for start in range(0, masks.shape[0], per):
            chunk = masks[start : start + per]
            ctx = MetricContext(torch.arange(n).repeat(chunk.shape[0]), clean_out, None)
            output = p.run(chunk, metric.positions(ctx, sizes), kept)
            ctx.example = ctx.example.to(output.device)
            with torch.inference_mode():
                out.append(metric(output, ctx).double().view(chunk.shape[0], n).mean(dim=1).cpu())
        return torch.cat(out)

    def score(values: torch.Tensor, current: float) -> torch.Tensor:
        return values - current if change == "increase" else (values - current).abs()

    removed = torch.zeros(len(g))
    current = float(evaluate(removed[None])[0])
    incoming: dict[int, list[int]] = {}
    for e, (s, r) in enumerate(g.edges):
        incoming.setdefault(r, []).append(e)
    for r in sorted(incoming, key=lambda r: (EdgeGraph._stage(g.receivers[r]), r), reverse=True):
        todo = sorted(incoming[r], key=lambda e: g.edges[e][0], reverse=True)
        while todo:
            # Round: every remaining candidate alone against the current circuit (one batched forward) ...
            masks = removed.repeat(len(todo), 1)
            masks[torch.arange(len(todo)), torch.tensor(todo)] = 1
            ok = torch.nonzero(score(evaluate(masks), current) < threshold).flatten()
            if len(ok) == 0:
                break
            # ... then, from the first acceptable one, the running removals todo[i], todo[i:i+2], ... (one more
            # forward): accepted while each step passes, exactly as one at a time; the first failure is rejected.
            i = int(ok[0])
            run = todo[i:]
            masks = removed.repeat(len(run), 1)
            for j, e in enumerate(run):
                masks[j:, e] = 1
            values = evaluate(masks)
            j = 0
            while j < len(run) and score(values[j : j + 1], current)[0] < threshold:
                removed[run[j]] = 1
                current = float(values[j])
                j += 1
            todo = run[j + 1 :]
    kept = 1 - removed.numpy()
    pruned: list[str] = []
    if prune:
        linked = connected(g, kept)
        pruned = [name for name, before, after in zip(g.edge_names, kept, linked) if before and not after]
        if pruned:
            kept = linked
            current = float(evaluate(torch.as_tensor(1 - kept, dtype=removed.dtype)[None])[0])
    return _result(p, kept, "acdc", metric, {
        "threshold": threshold, "change": change, "final_metric": current,
        "kept": [name for name, k in zip(g.edge_names, kept) if k], "pruned": pruned,
    })
