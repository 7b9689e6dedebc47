"""The attribution graph of one prompt: direct linear effects between features, errors, tokens and targets.

Nodes, in the reference's order: every active transcoder feature ``(layer, pos, feature)`` at the
clean run, one error node per ``(layer, pos)``, one token-embedding node per position, then the
targets (:mod:`.targets`). ``A[t, s]`` is the direct effect of source ``s`` on target ``t`` in the
local replacement model (:mod:`.replacement`): the derivative of ``t``'s input (a feature's
pre-activation ``mlp_in . W_enc[:, f]``, or ``norm(mlp_in) . W_enc[:, f]`` with the norm's scale frozen for a
transcoder reading the MLP's normed input; a target's value) along ``s``'s write (``a_s`` times its
decoder into every MLP output it writes, the error vector, the embedding), with every MLP output held
fixed, so nothing flows through another node. It is computed by backward passes of the frozen model,
one target per batch row and ``batch_size`` rows at a time, and kept as a sparse COO matrix of its
nonzero entries: the dense ``[nodes, nodes]`` matrix is never built.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ...engine.model import WrappedModel, wrap
from ...progress import progress_bar
from ...trainable.transcoder import Transcoder
from .influence import influence, normalize
from .replacement import CleanState, clean_state, direct_run
from .targets import Target, top_logit_targets

__all__ = ["AttributionGraph", "attribution_graph"]

logger = logging.getLogger(__name__)


@dataclass
class AttributionGraph:
    """Nodes and the sparse adjacency (rows: targets of an edge, columns: its sources)."""

    tokens: list[int]
    layers: list[int]  # the model's MLP layers (error nodes: one per layer and position)
    features: torch.Tensor  # [n_features, 3] long: (model layer, pos, feature index)
    activations: torch.Tensor  # [n_features]
    targets: list[Target]
    adjacency: torch.Tensor  # sparse COO [n_nodes, n_nodes]
    token_labels: list[str] | None = None
    prompt: str | None = None
    metadata: dict = field(default_factory=dict)

    @property
    def n_pos(self) -> int:
        return len(self.tokens)

    @property
    def n_features(self) -> int:
        return int(self.features.shape[0])

    @property
    def n_errors(self) -> int:
        return len(self.layers) * self.n_pos

    @property
    def n_nodes(self) -> int:
        return self.n_features + self.n_errors + self.n_pos + len(self.targets)

    def error_index(self, layer: int, pos: int) -> int:
        return self.n_features + self.layers.index(layer) * self.n_pos + pos

    def token_index(self, pos: int) -> int:
        return self.n_features + self.n_errors + pos

    def target_index(self, k: int) -> int:
        return self.n_features + self.n_errors + self.n_pos + k

    def feature_index(self, layer: int, pos: int, feature: int) -> int:
        f = self.features
        hit = ((f[:, 0] == layer) & (f[:, 1] == pos) & (f[:, 2] == feature)).nonzero()
        if hit.numel() == 0:
            raise KeyError(f"feature {feature} of layer {layer} is not active at position {pos}")
        return int(hit[0, 0])

    def kind(self, node: int) -> str:
        """``feature``, ``error``, ``token`` or ``target``."""
        if node < self.n_features:
            return "feature"
        if node < self.n_features + self.n_errors:
            return "error"
        return "token" if node < self.n_features + self.n_errors + self.n_pos else "target"

    def target_weights(self) -> torch.Tensor:
        """``[n_nodes]``: each target's weight at its node, zero elsewhere (what influence is read from)."""
        w = torch.zeros(self.n_nodes, dtype=torch.float64)
        for k, t in enumerate(self.targets):
            w[self.target_index(k)] = t.weight
        return w

    def dense(self) -> torch.Tensor:
        """The adjacency as a dense matrix (small graphs; tests and oracles)."""
        return self.adjacency.to_dense()


def _feature_nodes(state: CleanState) -> tuple[torch.Tensor, torch.Tensor]:
    rows, values = [], []
    for L in sorted(state.source_of):
        f = state.features[L]
        idx = f.nonzero()
        rows.append(torch.cat([torch.full((len(idx), 1), L, dtype=torch.long), idx.cpu()], 1))
        values.append(f[idx[:, 0], idx[:, 1]].detach())
    if not rows:
        return torch.zeros(0, 3, dtype=torch.long), torch.zeros(0)
    return torch.cat(rows), torch.cat(values)


def attribution_graph(
    model: Any,
    transcoder: Transcoder,
    prompt_or_ids: Any,
    *,
    targets: "Sequence[Target | int] | None" = None,
    desired_logit_prob: float = 0.95,
    max_n_logits: int = 10,
    batch_size: int = 32,
    source_chunk: int = 8192,
    max_feature_nodes: int | None = None,
    progress: bool | None = None,
) -> AttributionGraph:
    """The attribution graph of one prompt (see the module doc).

    ``targets``: None picks the most probable next tokens at the last position until their cumulative
    probability reaches ``desired_logit_prob`` (at most ``max_n_logits``); otherwise a list of token ids
    (demeaned logits at the last position) and :class:`Target` s (a logit difference, any direction at any
    site). ``batch_size`` targets share one backward pass; ``source_chunk`` bounds how many feature
    sources are read from its gradients at once. ``max_feature_nodes`` caps the feature rows computed:
    the targets' rows first, then batches of the not yet visited features with the largest influence
    on the partial graph (every active feature stays a source; an unvisited one has no inputs).
    """
    m: WrappedModel = wrap(model)
    state = clean_state(m, transcoder, prompt_or_ids)
    vocab = state.logits.shape[-1]
    if targets is None:
        chosen = top_logit_targets(state.logits, desired_probability=desired_logit_prob, max_targets=max_n_logits)
    else:
        from .targets import logit_target

        chosen = [t if isinstance(t, Target) else logit_target(int(t), vocab, dtype=state.logits.dtype,
                                                                 weight=1.0 / len(targets)) for t in targets]
    chosen = [Target(t.name, t.site, t.pos % state.n_pos, t.direction, t.weight, t.token, t.probability)
              for t in chosen]
    feats, acts = _feature_nodes(state)
    ids = state.inputs["input_ids"][0].tolist()
    graph = AttributionGraph(
        tokens=ids, layers=list(state.layers), features=feats, activations=acts.cpu(), targets=chosen,
        adjacency=torch.zeros(0), token_labels=m.to_str_tokens(ids) if m.tokenizer is not None else None,
        prompt=prompt_or_ids if isinstance(prompt_or_ids, str) else None,
        metadata={"batch_size": batch_size, "desired_logit_prob": desired_logit_prob, "max_n_logits": max_n_logits,
                  "max_feature_nodes": max_feature_nodes,
                  "transcoder": transcoder.config(), "model": type(m.module).__name__, "adapter": m.adapter.name},
    )
    graph.adjacency = _adjacency(state, graph, batch_size, source_chunk, max_feature_nodes, progress)
    graph.metadata["feature_rows"] = int(graph.adjacency.indices()[0].unique().lt(graph.n_features).sum())
    return graph


def _adjacency(state: CleanState, graph: AttributionGraph, batch_size: int, source_chunk: int,
               max_feature_nodes: int | None, progress: bool | None) -> torch.Tensor:
    """Rows of the targets, then of the features (all, or the most influential up to the cap), ``batch_size``
    at a time, as a sparse COO matrix."""
    n_feat, n = graph.n_features, graph.n_nodes
    rows_i: list[torch.Tensor] = []
    cols_i: list[torch.Tensor] = []
    vals: list[torch.Tensor] = []
    dec = _scaled_decoders(state, graph)

    def visit(batch: list[tuple[str, int]]) -> None:
        block = _rows(state, graph, batch, dec, source_chunk)  # [B, n_sources]
        nz = block.nonzero()
        rows_i.append(torch.tensor([graph.target_index(k) if kind == "target" else k for kind, k in batch])[nz[:, 0]])
        cols_i.append(nz[:, 1])
        vals.append(block[nz[:, 0], nz[:, 1]].double())

    def matrix() -> torch.Tensor:
        if rows_i:
            index, values = torch.stack([torch.cat(rows_i), torch.cat(cols_i)]), torch.cat(vals)
        else:
            index, values = torch.zeros(2, 0, dtype=torch.long), torch.zeros(0, dtype=torch.float64)
        return torch.sparse_coo_tensor(index, values, (n, n), check_invariants=False).coalesce()

    targets = [("target", k) for k in range(len(graph.targets))]
    cap = n_feat if max_feature_nodes is None else min(max_feature_nodes, n_feat)
    n_batches = -(-len(targets) // batch_size) + -(-cap // batch_size)
    bar = iter(progress_bar(range(n_batches), progress, desc="attribution rows"))
    for start in range(0, len(targets), batch_size):
        next(bar, None)
        visit(targets[start:start + batch_size])
    if cap == n_feat:
        order = list(range(n_feat))
        for start in range(0, n_feat, batch_size):
            next(bar, None)
            visit([("feature", k) for k in order[start:start + batch_size]])
        return matrix()
    visited = torch.zeros(n_feat, dtype=torch.bool)
    weights = graph.target_weights()
    while int(visited.sum()) < cap:
        next(bar, None)
        infl = influence(normalize(matrix()), weights)[:n_feat].masked_fill(visited, -1.0)
        take = infl.argsort(descending=True, stable=True)[: min(batch_size, cap - int(visited.sum()))]
        visited[take] = True
        visit([("feature", int(k)) for k in take])
    return matrix()


def _scaled_decoders(state: CleanState, graph: AttributionGraph) -> dict[int, list[tuple[int, torch.Tensor]]]:
    """Per source layer, for each MLP layer its features write: ``a_s * W_dec[f_s -> layer]`` ``[n_L, d]``."""
    out: dict[int, list[tuple[int, torch.Tensor]]] = {}
    tc = state.tc
    for L in sorted(state.source_of):
        sel = graph.features[:, 0] == L
        fidx, acts = graph.features[sel, 2], graph.activations[sel]
        i = state.source_of[L]
        out[L] = [(W, tc.decoder(i, state.output_of[W])[fidx].detach() * acts[:, None].to(tc.W_dec[i].dtype))
                  for W in state.source_writes(L)]
    return out


@torch.enable_grad()  # rows are gradients: they are computed under a caller's no_grad too
def _rows(state: CleanState, graph: AttributionGraph, batch: list[tuple[str, int]],
          dec: dict[int, list[tuple[int, torch.Tensor]]], source_chunk: int) -> torch.Tensor:
    """``[len(batch), n_features + n_errors + n_pos]`` direct effects on each job's node."""
    B, P = len(batch), state.n_pos
    dtype, device = state.embed.dtype, state.embed.device
    z_emb = torch.zeros(B, P, state.embed.shape[-1], dtype=dtype, device=device, requires_grad=True)
    z = {L: torch.zeros(B, P, state.mlp_out[L].shape[-1], dtype=dtype, device=device, requires_grad=True)
         for L in state.layers}
    capture = set()
    for kind, k in batch:
        capture.add(f"mlp_in.{int(graph.features[k, 0])}" if kind == "feature" else graph.targets[k].site)
    run = direct_run(state, rows=B, embed_delta=z_emb, mlp_delta=z, capture=sorted(capture), grad=True)
    total = 0.0
    for b, (kind, k) in enumerate(batch):
        if kind == "feature":
            L, p, f = (int(v) for v in graph.features[k])
            x = state.transcoder_input(L, run.cache[f"mlp_in.{L}"][b:b + 1].to(dtype))[0, p]
            total = total + x @ state.tc.W_enc[state.source_of[L]][:, f].detach()
        else:
            t = graph.targets[k]
            total = total + t.value(run.cache[t.site][b:b + 1].to(t.direction.dtype))[0].to(dtype)
    leaves = [z_emb, *z.values()]
    grads = torch.autograd.grad(total, leaves, allow_unused=True)
    g_emb = grads[0] if grads[0] is not None else torch.zeros_like(z_emb)
    g = {L: (gr if gr is not None else torch.zeros_like(z[L])) for L, gr in zip(z, grads[1:])}
    parts = []
    pos_all = graph.features[:, 1]
    for L in sorted(state.source_of):
        sel = (graph.features[:, 0] == L).nonzero()[:, 0]
        pos = pos_all[sel]
        block = torch.zeros(B, len(sel), dtype=dtype, device=device)
        for start in range(0, len(sel), source_chunk):
            stop = start + source_chunk
            for W, vecs in dec[L]:
                block[:, start:stop] += (g[W][:, pos[start:stop]] * vecs[start:stop][None]).sum(-1)
        parts.append(block)
    errors = [(g[L] * state.error[L][None]).sum(-1) for L in state.layers]
    tokens = (g_emb * state.embed[None]).sum(-1)
    return torch.cat([*parts, *errors, tokens], 1).detach().cpu()
