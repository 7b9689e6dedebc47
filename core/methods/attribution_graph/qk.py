"""QK attribution: which graph nodes at the query and key positions make one attention score.

In the local replacement model (:mod:`.replacement`: MLP outputs held at their clean values, attention
patterns and norm scales frozen) the residual that layer ``L``'s attention reads at position ``p`` is affine
in the graph's nodes: ``x_p = sum_i c_i[p] + r_p``, where ``c_i`` is node ``i``'s write (a feature's
``a * W_dec``, an error vector, a token embedding) carried to layer ``L`` by the frozen model and ``r`` what
the biases make on their own (norm and attention biases through the frozen patterns, the transcoder's
``b_dec``). With the norm's scale frozen at the clean run the query of head ``h`` at position ``t`` is affine
in ``x_t`` (``q = A_q x_t + b_q``, rotary included), and so is the key at ``u``; the pre-softmax score
``s = scale * q_t . k_u`` therefore splits exactly into pairs::

    s = sum_{i, j} scale * q_i . k_j      q_i = A_q c_i[t],  k_j = A_k c_j[u]  (node parts)
                                          q_bias = A_q r_t + b_q,  k_bias = A_k r_u + b_k  (one bias node)

A node's *query-side* term is its row of that matrix (``scale * q_i . k``), its *key-side* term its column;
removing node ``i``'s write from the frozen model changes the score by ``row_i + column_i - pair(i, i)``.

How the parts are computed. Queries and keys of any residual come from the adapter's decomposed forward (the
one CD-T runs, ``Adapter.decomposed_forward``, which visits every head's query and key after rotary and with
key/value heads repeated to their query heads) started at block ``L``, with the model's norms frozen
(:class:`.freeze.FrozenNorms`): each norm module there returns the frozen-scale output, so the query is the
affine map above evaluated exactly. By default (``method="rows"``) ``A_q`` at ``t`` and ``A_k`` at ``u`` are read
from basis directions (``d + 1`` rows of that forward), and each of their ``2 d_head`` rows is a target of the graph
(``direction_target("resid_pre.L", t, A_q[r])``) whose row of direct effects, computed by the graph's own backward
passes, is ``q_i[r]`` for every node at once. ``method="forward"`` instead carries each node's write to
``resid_pre.L`` in its own batch row of the frozen model (``c_i``, exact: the frozen model is affine) and takes
``q(c_i) - q(0)``; the two agree to rounding (a test). The bias node is the query of ``r`` (one run with every
node's write removed), biases included. ``scale`` is read off the clean run: the clean pattern's log-probabilities
must equal ``scale * q . k`` up to a constant per query row, fitted by least squares over the layer's heads and
checked (an attention that is not ``softmax(scale q k^T + mask)`` is refused).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ...engine.model import WrappedModel, wrap
from ...trainable.transcoder import Transcoder
from ..cdt import decomposed_forward
from .graph import AttributionGraph, _feature_nodes, _rows, _scaled_decoders
from .replacement import CleanState, clean_state, direct_run
from .targets import direction_target

__all__ = ["QKAttribution", "qk_attribution"]


class _Stop(Exception):
    """The query and key of the layer have been read: the rest of the decomposed forward is not needed."""


@dataclass
class QKAttribution:
    """One attention score split over the graph's nodes (see the module doc).

    Node ``n`` (``0 .. n_nodes - 1``; the last is the bias) has ``kinds[n]`` (``feature``, ``error``, ``token``,
    ``bias``), ``layers[n]`` / ``positions[n]`` / ``feature_ids[n]`` (``-1`` where it has none), ``labels[n]``
    and ``graph_index[n]``, its index in the attribution graph's node order (``-1`` for the bias).
    ``q[n]`` / ``k[n]`` (``[d_head]``) are its parts of the query at ``query_pos`` and of the key at ``key_pos``.
    """

    layer: int
    head: int
    query_pos: int
    key_pos: int
    score: float  # the model's pre-softmax score, scale * q . k at the clean run
    scale: float
    probability: float  # the clean attention probability of the edge
    q: torch.Tensor  # [n_nodes, d_head]
    k: torch.Tensor  # [n_nodes, d_head]
    kinds: list[str]
    layers: list[int]
    positions: list[int]
    feature_ids: list[int]
    labels: list[str]
    graph_index: list[int]
    metadata: dict = field(default_factory=dict)

    @property
    def n_nodes(self) -> int:
        return len(self.kinds)

    def pair(self, i: int, j: int) -> float:
        """The score's term of query node ``i`` and key node ``j``."""
        return float(self.scale * self.q[i] @ self.k[j])

    def pairs(self, query_nodes: "list[int] | None" = None, key_nodes: "list[int] | None" = None) -> torch.Tensor:
        """``[len(query_nodes), len(key_nodes)]`` pair terms (every node by default: small results only)."""
        qi = list(range(self.n_nodes)) if query_nodes is None else query_nodes
        kj = list(range(self.n_nodes)) if key_nodes is None else key_nodes
        return self.scale * self.q[qi] @ self.k[kj].T

    @property
    def query_terms(self) -> torch.Tensor:
        """``[n_nodes]``: each node's query-side term, ``scale * q_i . k`` (they sum to the score)."""
        return self.scale * self.q @ self.k.sum(0)

    @property
    def key_terms(self) -> torch.Tensor:
        """``[n_nodes]``: each node's key-side term, ``scale * q . k_j`` (they sum to the score)."""
        return self.scale * self.k @ self.q.sum(0)

    def total(self) -> float:
        """The sum of every pair term: the score, up to rounding."""
        return float(self.query_terms.sum())

    def removal_effect(self, node: int) -> float:
        """How much the score drops when ``node``'s write is removed from the frozen model (query and key side)."""
        return float(self.query_terms[node] + self.key_terms[node]) - self.pair(node, node)

    def top_pairs(self, n: int = 20, chunk: int = 4096) -> list[tuple[int, int, float]]:
        """The ``n`` pair terms largest in magnitude, ``(query node, key node, value)``, computed ``chunk``
        query rows at a time (the full matrix is never built)."""
        best: list[tuple[int, int, float]] = []
        for start in range(0, self.n_nodes, chunk):
            block = self.scale * self.q[start:start + chunk] @ self.k.T
            flat = block.flatten()
            top = flat.abs().topk(min(n, flat.numel()))
            cols = block.shape[1]
            best += [(start + int(i) // cols, int(i) % cols, float(flat[i])) for i in top.indices]
        best.sort(key=lambda t: -abs(t[2]))
        return best[:n]

    def top_nodes(self, side: str = "query", n: int = 10) -> list[tuple[int, float]]:
        """The ``n`` nodes with the largest ``side`` (``query``, ``key`` or ``removal``) terms in magnitude."""
        if side == "removal":
            values = torch.tensor([self.removal_effect(i) for i in range(self.n_nodes)], dtype=torch.float64)
        elif side in ("query", "key"):
            values = self.query_terms if side == "query" else self.key_terms
        else:
            raise ValueError(f"side is 'query', 'key' or 'removal', not {side!r}")
        order = values.abs().argsort(descending=True)[:n]
        return [(int(i), float(values[i])) for i in order]

    def to_dict(self, top: int = 20) -> dict:
        """JSON-ready: the edge, the score, every node with its query- and key-side terms, the top pairs."""
        qt, kt = self.query_terms.tolist(), self.key_terms.tolist()
        nodes = [
            {"index": n, "kind": self.kinds[n], "label": self.labels[n], "layer": self.layers[n],
             "pos": self.positions[n], "feature": self.feature_ids[n], "graph_index": self.graph_index[n],
             "query_term": qt[n], "key_term": kt[n]}
            for n in range(self.n_nodes)
        ]
        return {
            "layer": self.layer, "head": self.head, "query_pos": self.query_pos, "key_pos": self.key_pos,
            "score": self.score, "scale": self.scale, "probability": self.probability, "sum_of_terms": self.total(),
            "nodes": nodes,
            "top_pairs": [{"query_node": i, "key_node": j, "value": v} for i, j, v in self.top_pairs(top)],
            "metadata": self.metadata,
        }

    def plot(self, path: "str | Path | None" = None, top: int = 10):
        """Query-side and key-side terms of the ``top`` nodes (bars) and their pair terms (heat map, red
        positive); saved to ``path`` when given. Returns the matplotlib figure."""
        import matplotlib

        if path is not None:
            matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        qn, kn = self.top_nodes("query", top), self.top_nodes("key", top)
        fig, axes = plt.subplots(1, 3, figsize=(17, 0.42 * top + 2.6), gridspec_kw={"width_ratios": [1, 1, 1.25]})
        for ax, nodes, side in ((axes[0], qn, "query"), (axes[1], kn, "key")):
            labels = [self.labels[i] for i, _ in nodes][::-1]
            values = [v for _, v in nodes][::-1]
            ax.barh(range(len(values)), values, color=["#b2182b" if v > 0 else "#2166ac" for v in values])
            ax.set_yticks(range(len(values)), labels, fontsize=8)
            ax.axvline(0, color="black", lw=0.6)
            pos = self.query_pos if side == "query" else self.key_pos
            ax.set_title(f"{side}-side terms (position {pos})", fontsize=10)
            ax.set_xlabel("contribution to the score")
        qi, kj = [i for i, _ in qn], [j for j, _ in kn]
        block = self.pairs(qi, kj).numpy()
        lim = float(abs(block).max()) or 1.0
        im = axes[2].imshow(block, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
        axes[2].set_yticks(range(len(qi)), [self.labels[i] for i in qi], fontsize=7)
        axes[2].set_xticks(range(len(kj)), [self.labels[j] for j in kj], fontsize=7, rotation=60, ha="right")
        axes[2].set_title("pair terms (query node x key node)", fontsize=10)
        fig.colorbar(im, ax=axes[2], fraction=0.04)
        fig.suptitle(f"QK attribution, layer {self.layer} head {self.head}: query {self.query_pos} -> key {self.key_pos}"
                     f"   score {self.score:.3f} (sum of terms {self.total():.3f}), p = {self.probability:.3f}",
                     fontsize=11)
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=110)
        return fig


# -- computation ----------------------------------------------------------------------------------------


@dataclass
class _Nodes:
    """Every source of the graph, in its order: features, error nodes, tokens."""

    kinds: list[str]
    layers: list[int]
    positions: list[int]
    feature_ids: list[int]
    activation: list[float]

    def reaches(self, n: int, layer: int) -> bool:
        """Whether node ``n`` can write the residual layer ``layer``'s attention reads."""
        return self.kinds[n] == "token" or self.layers[n] < layer


def _nodes(state: CleanState) -> tuple[_Nodes, torch.Tensor, torch.Tensor]:
    """The graph's sources in its node order, and the features' ``(layer, pos, f)`` and activations."""
    feats, acts = _feature_nodes(state)
    nodes = _Nodes([], [], [], [], [])

    def add(kind: str, L: int, p: int, f: int, a: float = 1.0) -> None:
        for lst, v in zip((nodes.kinds, nodes.layers, nodes.positions, nodes.feature_ids, nodes.activation),
                          (kind, L, p, f, a)):
            lst.append(v)

    for k, (L, p, f) in enumerate(feats.tolist()):
        add("feature", L, p, f, float(acts[k]))
    for L in state.layers:
        for p in range(state.n_pos):
            add("error", L, p, -1)
    for p in range(state.n_pos):
        add("token", -1, p, -1)
    return nodes, feats, acts


class _QueryKey:
    """Every head's query and key ``[rows, pos, head, d_head]`` of block ``layer`` reading chosen residuals
    ``[rows, pos, d]``, through the adapter's decomposed forward with the norms frozen at the clean run (keys
    repeated to their query heads)."""

    def __init__(self, m: WrappedModel, state: CleanState, layer: int):
        try:
            self.forward = decomposed_forward(m)
        except NotImplementedError as e:
            raise NotImplementedError(f"QK attribution reads each head's query and key through the same forward: {e}") from None
        names = {f.name for f in self.forward.families}
        if not {"resid_pre", "head_q", "head_k"} <= names:
            raise NotImplementedError(f"the decomposed forward of {type(m.module).__name__} visits no resid_pre / "
                                      f"head_q / head_k nodes (it has {sorted(names)})")
        self.state, self.layer = state, layer
        self.prepared = self.forward.prepare(state.inputs)

    def __call__(self, residuals: torch.Tensor, elements: int = 2 ** 22) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries and keys of ``residuals``, about ``elements`` residual values per forward."""
        chunk = max(1, elements // (residuals.shape[1] * residuals.shape[2]))
        qs, ks = [], []
        for start in range(0, residuals.shape[0], chunk):
            q, k = self._run(residuals[start:start + chunk])
            qs.append(q)
            ks.append(k)
        return torch.cat(qs), torch.cat(ks)

    def _run(self, residuals: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        read: dict[str, torch.Tensor] = {}
        layer = self.layer

        def visit(key: str, pair):
            if key == f"resid_pre.{layer}":
                y = residuals.to(pair[1].dtype)
                return torch.zeros_like(y), y
            if key in (f"head_q.{layer}", f"head_k.{layer}"):
                read[key.split(".")[0]] = (pair[0] + pair[1]).detach().clone()
                if len(read) == 2:
                    raise _Stop
            return pair

        with torch.no_grad(), self.state.norms.frozen():
            try:
                self.forward.run(self.prepared, visit, repeat=residuals.shape[0], start=layer)
            except _Stop:
                pass
        if len(read) != 2:
            raise RuntimeError(f"the decomposed forward did not visit head_q.{layer} and head_k.{layer}")
        return read["head_q"], read["head_k"]


def _write_rows(state: CleanState, nodes: _Nodes, idx: "list[int]") -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """The writes of nodes ``idx``, one batch row each: ``(embed delta, {layer: mlp_out delta})`` ``[rows, pos, d]``."""
    P, d, tc = state.n_pos, state.embed.shape[-1], state.tc
    dtype, device = state.embed.dtype, state.embed.device
    emb = torch.zeros(len(idx), P, d, dtype=dtype, device=device)
    mlp = {L: torch.zeros(len(idx), P, d, dtype=dtype, device=device) for L in state.layers}
    for b, n in enumerate(idx):
        kind, L, p = nodes.kinds[n], nodes.layers[n], nodes.positions[n]
        if kind == "feature":
            i = state.source_of[L]
            for W in state.source_writes(L):
                mlp[W][b, p] += nodes.activation[n] * tc.decoder(i, state.output_of[W])[nodes.feature_ids[n]].detach().to(dtype)
        elif kind == "error":
            mlp[L][b, p] += state.error[L][p]
        else:
            emb[b, p] += state.embed[p]
    return emb, mlp


@torch.no_grad()
def _bias_residual(state: CleanState, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``resid_pre.layer`` ``[pos, d]`` of the frozen model at the clean point, and with every node's write removed
    (the embeddings at 0, each MLP output at the transcoder's bias): what the biases make on their own."""
    site, tc, dtype = f"resid_pre.{layer}", state.tc, state.embed.dtype
    clean = direct_run(state, capture=[site]).cache[site][0].to(dtype)
    keep = {L: (tc.b_dec[state.output_of[L]].detach().to(dtype) if L in state.output_of else 0.0) for L in state.layers}
    run = direct_run(state, embed_delta=-state.embed[None],
                     mlp_delta={L: (keep[L] - state.mlp_out[L])[None] for L in state.layers}, capture=[site])
    return clean, run.cache[site][0].to(dtype)


@torch.no_grad()
def _parts_forward(state: CleanState, nodes: _Nodes, qk: _QueryKey, layer: int, t: int, u: int, head: int,
                   batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Node parts of the query and key by forwards: each reaching node's write in its own row of the frozen model,
    the change of ``resid_pre.layer`` read at ``t`` and ``u``, then ``q(c) - q(0)``."""
    site = f"resid_pre.{layer}"
    reach = [n for n in range(len(nodes.kinds)) if nodes.reaches(n, layer)]
    P, d, dtype = state.n_pos, state.embed.shape[-1], state.embed.dtype
    rows = [torch.zeros(1, P, d, dtype=dtype, device=state.embed.device)]  # q(0)
    for start in range(0, len(reach), batch_size):
        idx = reach[start:start + batch_size]
        emb, mlp = _write_rows(state, nodes, idx)
        # row 0 of each forward is the unperturbed run: the same batch shape rounds the same way, so a position
        # a node cannot reach differs by exactly 0
        emb = torch.cat([torch.zeros_like(emb[:1]), emb])
        mlp = {L: torch.cat([torch.zeros_like(v[:1]), v]) for L, v in mlp.items()}
        out = direct_run(state, rows=len(idx) + 1, embed_delta=emb, mlp_delta=mlp, capture=[site]).cache[site].to(dtype)
        c = out[1:] - out[:1]
        y = torch.zeros_like(c)
        y[:, t], y[:, u] = c[:, t], c[:, u]
        rows.append(y)
    q_all, k_all = qk(torch.cat(rows))
    dh = q_all.shape[-1]
    q = torch.zeros(len(nodes.kinds), dh, dtype=q_all.dtype, device=q_all.device)
    k = torch.zeros_like(q)
    q[reach], k[reach] = q_all[1:, t, head] - q_all[0, t, head], k_all[1:, u, head] - k_all[0, u, head]
    return q, k


def _linear_maps(state: CleanState, qk: _QueryKey, t: int, u: int, head: int, clean: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``A_q`` at ``t`` and ``A_k`` at ``u`` (``[d_head, d]``): the frozen-norm query and key maps of the residual,
    one basis direction per row (scaled to the residual's size) minus the zero row."""
    P, d = state.n_pos, clean.shape[-1]
    ct = max(1.0, float(clean[t].abs().max()))
    cu = ct if u == t else max(1.0, float(clean[u].abs().max()))
    q0, k0 = qk(torch.zeros(1, P, d, dtype=clean.dtype, device=clean.device))
    a_q = torch.zeros(q0.shape[-1], d, dtype=q0.dtype, device=q0.device)
    a_k = torch.zeros_like(a_q)
    step = max(1, 2 ** 22 // (P * d))  # basis rows built a chunk at a time: [d, pos, d] at once would not fit
    for start in range(0, d, step):
        dims = torch.arange(start, min(start + step, d), device=clean.device)
        rows = torch.zeros(len(dims), P, d, dtype=clean.dtype, device=clean.device)
        rows[torch.arange(len(dims)), t, dims] = ct
        rows[torch.arange(len(dims)), u, dims] = cu
        q, k = qk(rows)
        a_q[:, dims] = ((q[:, t, head] - q0[0, t, head]) / ct).T
        a_k[:, dims] = ((k[:, u, head] - k0[0, u, head]) / cu).T
    return a_q, a_k


def _parts_rows(state: CleanState, nodes: _Nodes, feats: torch.Tensor, acts: torch.Tensor, qk: _QueryKey, layer: int,
                t: int, u: int, head: int, clean: torch.Tensor, batch_size: int, source_chunk: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Node parts of the query and key as rows of the graph: each coordinate ``r`` of the query is the direction
    ``A_q[r]`` read from ``resid_pre.layer`` at ``t`` (a target), whose row of direct effects over the sources is
    ``q_i[r]``; ``2 d_head`` rows by backward passes, whatever the number of nodes."""
    a_q, a_k = _linear_maps(state, qk, t, u, head, clean)
    site = f"resid_pre.{layer}"
    targets = [direction_target(site, t, a_q[r]) for r in range(a_q.shape[0])]
    targets += [direction_target(site, u, a_k[r]) for r in range(a_k.shape[0])]
    g = AttributionGraph(tokens=state.inputs["input_ids"][0].tolist(), layers=list(state.layers), features=feats,
                         activations=acts.cpu(), targets=targets, adjacency=torch.zeros(0))
    dec = _scaled_decoders(state, g)
    jobs = [("target", k) for k in range(len(targets))]
    rows = torch.cat([_rows(state, g, jobs[s:s + batch_size], dec, source_chunk) for s in range(0, len(jobs), batch_size)])
    dh = a_q.shape[0]
    return rows[:dh].T.to(a_q.device), rows[dh:].T.to(a_q.device)


def _fit_scale(q: torch.Tensor, k: torch.Tensor, pattern: torch.Tensor, layer: int) -> float:
    """``scale`` with ``log pattern = scale * q . k + const(row)`` on the unmasked keys of every head and query
    row (``q``, ``k``: ``[pos, head, d_head]``; ``pattern``: ``[head, pos, key_pos]``), checked."""
    raw = torch.einsum("thd,uhd->htu", q.double(), k.double())
    p = pattern.double()
    valid = p > 0
    logp = torch.where(valid, p.clamp_min(1e-300).log(), torch.zeros_like(p))
    raw = torch.where(valid, raw, torch.zeros_like(raw))
    count = valid.sum(-1, keepdim=True).clamp_min(1)
    a = torch.where(valid, logp - logp.sum(-1, keepdim=True) / count, torch.zeros_like(p))
    b = torch.where(valid, raw - raw.sum(-1, keepdim=True) / count, torch.zeros_like(p))
    denom = float((b * b).sum())
    if denom == 0.0:
        raise ValueError(f"layer {layer}'s attention scores do not vary over any query's keys: its scale cannot be read")
    scale = float((a * b).sum()) / denom
    gap = float((a - scale * b).abs().max())
    tol = 1e-6 if q.dtype == torch.float64 else 1e-3 if q.dtype == torch.float32 else 5e-2
    if gap > tol * max(1.0, float(a.abs().max())):
        raise ValueError(
            f"layer {layer}'s clean pattern is not softmax(scale * q . k + mask) of the queries and keys the decomposed "
            f"forward gives (best scale {scale:.6g} leaves log-probabilities off by {gap:.3g}); QK attribution needs "
            f"plain scaled dot-product attention"
        )
    return scale


def _label(kind: str, L: int, p: int, f: int, tokens: "list[str] | None") -> str:
    tok = f" {tokens[p]!r}" if tokens is not None and p >= 0 else ""
    if kind == "feature":
        return f"L{L} f{f} @{p}{tok}"
    if kind == "error":
        return f"err L{L} @{p}{tok}"
    if kind == "token":
        return f"emb @{p}{tok}"
    return "bias"


def qk_attribution(
    model: Any,
    transcoder: Transcoder,
    prompt_or_ids: Any,
    layer: int,
    head: int,
    query_pos: int,
    key_pos: int,
    *,
    graph: "AttributionGraph | None" = None,
    method: str = "rows",
    batch_size: int = 32,
    source_chunk: int = 8192,
) -> QKAttribution:
    """Split head ``head`` of layer ``layer``'s pre-softmax score from ``query_pos`` to ``key_pos`` over the
    attribution graph's nodes (see the module doc). Positions may be negative (from the end). ``graph``, when
    given, must be this prompt's graph with this transcoder (checked); ``graph_index`` always follows its order.

    ``method="rows"`` (default) computes the nodes' parts as ``2 d_head`` rows of the graph (backward passes,
    ``batch_size`` rows each, ``source_chunk`` sources read at once), whatever the number of nodes;
    ``method="forward"`` runs the frozen model once per ``batch_size`` nodes with each node's write in its own row
    (a second computation, for checks and small graphs)."""
    if method not in ("rows", "forward"):
        raise ValueError(f"method is 'rows' or 'forward', not {method!r}")
    if transcoder.W_skip is not None:
        raise NotImplementedError("QK attribution of a skip transcoder: its nodes' writes are read through the "
                                  "decomposed forward, which does not carry the skip term; use one without W_skip")
    m: WrappedModel = wrap(model)
    state = clean_state(m, transcoder, prompt_or_ids)
    P = state.n_pos
    if layer not in state.layers:
        raise ValueError(f"layer {layer} is not an attention layer of the model (it has {state.layers})")
    n_heads = int(state.patterns[layer].shape[1])
    if not 0 <= head < n_heads:
        raise ValueError(f"head {head} is out of range: layer {layer} has heads 0..{n_heads - 1}")
    for name, pos in (("query_pos", query_pos), ("key_pos", key_pos)):
        if not -P <= pos < P:
            raise ValueError(f"{name} {pos} is outside the prompt's {P} positions")
    t, u = query_pos % P, key_pos % P
    probability = float(state.patterns[layer][0, head, t, u])
    if probability == 0.0:
        raise ValueError(f"query position {t} does not attend to key position {u} in layer {layer} head {head} "
                         f"(its clean probability is exactly 0: masked)")
    nodes, feats, acts = _nodes(state)
    if graph is not None:
        if list(graph.tokens) != state.inputs["input_ids"][0].tolist() or not torch.equal(graph.features, feats):
            raise ValueError("the graph passed is not this prompt's graph with this transcoder (its tokens or active "
                             "features differ)")
    qk = _QueryKey(m, state, layer)
    clean, r = _bias_residual(state, layer)
    fixed = torch.zeros(2, P, clean.shape[-1], dtype=clean.dtype, device=clean.device)
    fixed[0] = clean
    fixed[1, t], fixed[1, u] = r[t], r[u]
    q_fixed, k_fixed = qk(fixed)  # the clean query and key, and the bias node's (biases included)
    scale = _fit_scale(q_fixed[0], k_fixed[0], state.patterns[layer][0], layer)
    if method == "rows":
        q_nodes, k_nodes = _parts_rows(state, nodes, feats, acts, qk, layer, t, u, head, clean, batch_size, source_chunk)
    else:
        q_nodes, k_nodes = _parts_forward(state, nodes, qk, layer, t, u, head, batch_size)
    q_clean, k_clean = q_fixed[0, t, head].double().cpu(), k_fixed[0, u, head].double().cpu()
    q = torch.cat([q_nodes.double().cpu(), q_fixed[1, t, head].double().cpu()[None]])
    k = torch.cat([k_nodes.double().cpu(), k_fixed[1, u, head].double().cpu()[None]])
    closure = max(float((q.sum(0) - q_clean).abs().max()), float((k.sum(0) - k_clean).abs().max()))
    score = float(scale * q_clean @ k_clean)

    keep = [n for n in range(len(nodes.kinds)) if bool(q[n].any() or k[n].any())]
    idx = keep + [len(nodes.kinds)]
    tokens = m.to_str_tokens(state.inputs["input_ids"][0].tolist()) if m.tokenizer is not None else None
    kinds = [nodes.kinds[n] for n in keep] + ["bias"]
    layers = [nodes.layers[n] for n in keep] + [-1]
    positions = [nodes.positions[n] for n in keep] + [-1]
    fids = [nodes.feature_ids[n] for n in keep] + [-1]
    result = QKAttribution(
        layer=layer, head=head, query_pos=t, key_pos=u, score=score, scale=scale, probability=probability,
        q=q[idx], k=k[idx], kinds=kinds, layers=layers, positions=positions, feature_ids=fids,
        labels=[_label(kd, L, p, f, tokens) for kd, L, p, f in zip(kinds, layers, positions, fids)],
        graph_index=keep + [-1],
        metadata={"closure": closure, "method": method, "n_sources": len(nodes.kinds), "d_head": int(q.shape[-1]),
                  "prompt": prompt_or_ids if isinstance(prompt_or_ids, str) else None,
                  "transcoder": transcoder.config(), "model": type(m.module).__name__, "adapter": m.adapter.name},
    )
    result.metadata["gap"] = abs(result.total() - score)
    if not math.isfinite(result.metadata["gap"]):
        raise FloatingPointError("QK attribution produced a non-finite score")
    return result
