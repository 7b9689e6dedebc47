"""Exact edge patching in one forward: the sender interventions record each sender's ``ablated - current``
as it fires, the receiver interventions add the masked sum of those differences to their input, and
``EdgePatcher`` holds the clean inputs, the ablated sender values (resample, zero or mean) and the graph,
runs any stack of edge masks as row blocks of one forward and, with a kept clean prefix
(``_CleanPrefix``), starts that forward at the first block a mask patches; :func:`patch_edges` is
its public face.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Sequence

import torch
from torch import nn

from ...engine.adapter import batch_size as rows_of, repeat_rows
from ...engine.forward import Bound, execute
from ...engine.interventions import Intervention
from ...engine.model import WrappedModel, wrap
from ...engine.resume import Prefix, Resume
from ...sites.site import Site
from ...engine.text import check_same_lengths, is_text
from ..attribution import _read_key
from ..shared_prefix import capture_sharing_prefix
from .graph import EdgeGraph, _layer, _role, edge_graph, spread_groups

Ablation = Literal["resample", "zero", "mean"]


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
        k, n_in = self.mask.shape[:2]
        mask = self.mask.to(device=x.device, dtype=x.dtype).reshape(k, 1, n_in, -1).transpose(2, 3)  # [k, 1, slots, s]
        # One batched matmul per mask over its rows' positions: [slots, s] @ [s, d] at every (row, pos) of the block.
        return x + torch.matmul(mask, diffs.reshape(k, -1, n_in, diffs.shape[-1])).view(x.shape)


class EdgePatcher:
    """Clean inputs, ablated sender values and the graph: runs any stack of edge masks in one forward."""

    def __init__(self, model, clean, corrupt, ablation: Ablation, reference, graph: EdgeGraph | None):
        if ablation not in ("resample", "zero", "mean"):
            raise ValueError(f"ablation must be 'resample', 'zero' or 'mean', got {ablation!r}")
        self.m = m = wrap(model)
        self.graph = graph or edge_graph(m)
        if is_text(clean) and is_text(corrupt):  # a length mismatch is shown token by token
            check_same_lengths(m.tokenizer, clean, corrupt)
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
        # differ, and the positions a clean gradient run computed its output at (its gradients are zero
        # elsewhere, so the corrupt run's ``output_only`` keys are needed there alone, prefix or not).
        self.first: tuple | None = None
        self.read_at: torch.Tensor | None = None
        # The last MLP's write reaches only logits_in, and the last MLP's input only that write: where these are used
        # only through logits_in's gradient (or their own), which is zero away from the positions the metric reads,
        # the model may compute them at those alone (the last MLP, and the attention output projection before it).
        last = self.n_layers - 1
        self.output_only = tuple(f"{self.graph.tower}{f}" for f in (f"mlp_out.{last}", f"mlp_in.{last}", "logits_in"))
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
        ``first`` when a clean run kept one (:mod:`~crosspatch.methods.shared_prefix`)."""
        if self._ablated_raw is None and self._corrupt is not None:
            if self.read_at is not None:  # values for a clean gradient run's gradients only (with or without a prefix)
                at, only = self.read_at, self.output_only
            else:  # the output is not read
                at, only = torch.full((self.n,), self.m.adapter.sizes(self._corrupt).get("pos", 1) - 1), ()
            _, values, self.shared_positions = capture_sharing_prefix(self.m, self._corrupt, self.read_keys, at, self.first, only)
            self.forwards += 1
            self.first = None
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

    def per_sender_map(self, key: str, raw: torch.Tensor) -> torch.Tensor | None:
        """Sender ``key``'s linear map from its value as read (``raw`` ``[rows, pos, k, e]``) to its own, one
        ``[e, d]`` matrix per sender as ``[k, e, d]``; None when it is read as itself. Read off the family's
        ``linear_from`` (bias-free, the same map at every position) applied to the identity laid along the
        position axis: exact, and no adapter needs to say where its weights are."""
        if self.reads[key] == key:
            return None
        k, e = raw.shape[-2:]
        eye = torch.eye(e, dtype=raw.dtype, device=raw.device)[None, :, None, :].expand(1, e, k, e)
        return self.writes(key, eye)[0].transpose(0, 1)  # [k, e, d]

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
        return [spread_groups(d, g.kv_group) if d.ndim == 4 else d for d in out]

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
        start = self._start(dense) if clean is not None else 0
        resume = Resume(clean.prefix, start) if start > 0 else None
        bounds = self.bounds(dense, k, clean if resume is not None else None, start)
        return self._execute(inputs, bounds, output_at=output_at, resume=resume).output

    def bounds(self, dense: list[torch.Tensor], k: int, clean: "_CleanPrefix | None" = None, start: int = 0) -> list[Bound]:
        """The bounds that patch ``k`` masks' edges (``dense``: one ``[k, n_in, *slots]`` mask per receiver) in
        a run of the clean inputs repeated ``k`` times. With ``clean``, a run resumed at block ``start``: the
        senders before it add their kept ``ablated - clean`` and the receivers before it are left out."""
        n_layers = self.n_layers
        state = _State()
        bounds = []
        for key in self.keys:
            if clean is not None and _layer(key, n_layers) < start:
                state.diffs.append(clean.diffs[key].repeat(k, *([1] * (clean.diffs[key].ndim - 1))))
                continue
            abl = None if self.ablated is None else self.ablated_for(key, k)
            bounds.append(Bound(Site.parse(key), _Sender(state, key, abl) if abl is not None else _ZeroSender(state, key)))
        for (key, n_in, _), d in zip(self.graph.receiver_keys, dense):
            if clean is None or _layer(key, n_layers) >= start:  # the others are before the start and unpatched
                bounds.append(Bound(Site.parse(key), _Receiver(state, n_in, d, self.n)))
        return bounds


@dataclass
class _CleanPrefix:
    prefix: Prefix
    diffs: dict[str, torch.Tensor]  # per sender key, ablated - clean, [n, pos, k, d]


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
    return EdgePatcher(model, clean, corrupt, ablation, reference, graph).run(edge_mask)
