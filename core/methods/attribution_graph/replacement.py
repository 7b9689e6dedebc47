"""The local replacement model of one prompt: the clean run, and forwards with its nonlinearities frozen.

:func:`clean_state` runs the prompt once, capturing ``embed``, every ``mlp_in`` / ``mlp_out``, every
``attn_pattern`` and the logits, recording the norms' scales (:class:`~.freeze.FrozenNorms`) and
encoding each layer's MLP input with the transcoder. Every MLP output then splits exactly into the
transcoder's reconstruction and an error::

    mlp_out_L = sum over sources i writing L of f_i @ W_dec[i -> L] + b_dec[L] (+ skip_L) + error_L

(a layer the transcoder does not cover is all error). A skip transcoder's term ``skip_L = x_L @ W_skip.T``
is linear in what the transcoder reads, so in every frozen forward it is recomputed from the run's own
input, like attention with its pattern frozen: paths through it are direct effects, as in circuit-tracer. A transcoder reading the MLP's normed input
(``normalized_input``, GemmaScope) reads the norm's clean output at the clean run and its frozen-scale output
in the frozen forwards (:mod:`.normed`). In the *local replacement model* attention
patterns and norm scales are the clean run's, each feature's nonlinearity is its clean on/off mask
(``f_i = mask_i * pre_i``) and the errors are constants, so logits are an affine function of the
embeddings: :func:`replacement_run` is that model (it reproduces the clean logits), and
:func:`direct_run` the one an edge weight is a derivative of, where every MLP output is held at its
clean value plus chosen perturbations (nothing propagates through another node).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ...engine.adapter import repeat_rows
from ...engine.forward import Bound, Run
from ...engine.interventions import Fn
from ...engine.model import WrappedModel
from ...sites.site import Site, SiteError
from ...trainable.transcoder import Transcoder
from .freeze import FrozenNorms, pattern_bounds
from .normed import frozen_input, mlp_norms

__all__ = ["CleanState", "clean_state", "replacement_run", "direct_run", "mlp_layers"]


def mlp_layers(m: WrappedModel) -> list[int]:
    """The model's layers that have ``mlp_in``, ``mlp_out`` and ``attn_pattern`` sites (a SiteError otherwise)."""
    need = ("embed", "mlp_in", "mlp_out", "attn_pattern", "logits")
    names = {f.name for f in m.catalog}
    missing = [n for n in need if n not in names]
    if missing:
        raise SiteError(
            f"attribution graphs need the site families {', '.join(need)}; {type(m.module).__name__} "
            f"({m.adapter.name}) lacks {', '.join(missing)}"
        )
    return list(range(int(m.catalog.family("mlp_out").layers or 0)))


@dataclass
class CleanState:
    """Everything the replacement model holds from the clean run (tensors without the batch axis)."""

    m: WrappedModel
    tc: Transcoder
    inputs: dict  # prepared, one row
    layers: list[int]  # the model's MLP layers
    source_of: dict[int, int]  # model layer -> transcoder source index (layers it covers)
    output_of: dict[int, int]  # model layer -> transcoder output index
    embed: torch.Tensor  # [pos, d]
    mlp_in: dict[int, torch.Tensor]
    mlp_out: dict[int, torch.Tensor]
    patterns: dict[int, torch.Tensor]  # [1, head, pos, key_pos]
    logits: torch.Tensor  # [pos, vocab]
    pre: dict[int, torch.Tensor]  # model layer -> [pos, n_features] pre-activations
    features: dict[int, torch.Tensor]  # model layer -> [pos, n_features]
    recon: dict[int, torch.Tensor]  # model layer -> [pos, d] reconstruction (b_dec included)
    error: dict[int, torch.Tensor]  # model layer -> [pos, d]
    norms: FrozenNorms = field(repr=False, default=None)  # type: ignore[assignment]
    input_norms: dict = field(repr=False, default_factory=dict)  # model layer -> the MLP's norm (normed-input transcoders)
    skip_clean: dict = field(repr=False, default_factory=dict)  # output layer -> its skip term at the clean run

    @property
    def n_pos(self) -> int:
        return int(self.embed.shape[0])

    def rows(self, n: int) -> dict:
        return repeat_rows(self.inputs, n)

    def transcoder_input(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """What source ``layer`` of the transcoder reads from ``mlp_in.layer`` ``[rows, pos, d]``: the site itself, or
        for a normed-input transcoder the MLP's norm of it with the scale frozen (:mod:`.normed`)."""
        norm = self.input_norms.get(layer)
        return x if norm is None else frozen_input(norm, x)

    def layer_of_output(self, j: int) -> int:
        return next(layer for layer, o in self.output_of.items() if o == j)

    def skip_source(self, layer: int) -> "int | None":
        """The model layer whose transcoder input output ``layer``'s skip term reads (None without a skip)."""
        if self.tc.W_skip is None or layer not in self.output_of:
            return None
        return next((L for L, i in self.source_of.items() if i == self.output_of[layer]), None)

    def skip_term(self, layer: int, read: "dict[int, torch.Tensor]", dtype: torch.dtype) -> "torch.Tensor | None":
        """Output ``layer``'s skip term from the transcoder inputs ``read`` of this forward (None without one)."""
        src = self.skip_source(layer)
        return None if src is None else self.tc.skip(self.output_of[layer], read[src]).to(dtype)

    def source_writes(self, layer: int) -> list[int]:
        """Model layers whose MLP output the features of source ``layer`` write."""
        i = self.source_of[layer]
        return [self.layer_of_output(j) for j in self.tc.outputs_of(i) if j in self.output_of.values()]


def _layer_of(site: str, family: str) -> int:
    s = Site.parse(site)
    if s.family != family or s.layer is None or s.selection:
        raise SiteError(
            f"attribution graphs read transcoders from {family}.<layer> sites; this one has {site} "
            f"(train one with input_sites mlp_in.L and output_sites mlp_out.L)"
        )
    return int(s.layer)


@torch.no_grad()
def clean_state(m: WrappedModel, tc: Transcoder, inputs: Any) -> CleanState:
    """Run ``inputs`` (one prompt) once and split every MLP output into features and an error."""
    layers = mlp_layers(m)
    source_of = {_layer_of(s, "mlp_in"): i for i, s in enumerate(tc.input_sites)}
    output_of = {_layer_of(s, "mlp_out"): j for j, s in enumerate(tc.output_sites)}
    bad = sorted(set(source_of) - set(layers)) + sorted(set(output_of) - set(layers))
    if bad:
        raise SiteError(f"transcoder layers {bad} are not MLP layers of the model (it has {layers})")
    prepared = m.prepare(inputs)
    ids = prepared.get("input_ids")
    if ids is None or ids.shape[0] != 1:
        raise ValueError(f"an attribution graph is of one prompt; got inputs of shape "
                         f"{None if ids is None else tuple(ids.shape)}")
    mask = prepared.get("attention_mask")
    if mask is not None and not bool(mask.bool().all()):
        raise ValueError("an attribution graph's prompt has no padding; pass its tokens alone")
    norms = FrozenNorms(m.module)
    sites = ["embed", "logits", *(f"mlp_in.{L}" for L in layers), *(f"mlp_out.{L}" for L in layers),
             *(f"attn_pattern.{L}" for L in layers)]
    with norms.recording():
        run = m.run(prepared, capture=sites)
    norms.detach()  # the run was under inference mode: its tensors cannot enter autograd as they are
    cache = {s: run.cache[s].clone() for s in sites}
    dtype = tc.W_enc.dtype
    mlp_in = {L: cache[f"mlp_in.{L}"][0].to(dtype) for L in layers}
    mlp_out = {L: cache[f"mlp_out.{L}"][0].to(dtype) for L in layers}
    input_norms = mlp_norms(norms, {L: cache[f"mlp_in.{L}"][:1] for L in source_of}) if tc.normalized_input else {}
    pre, feats, reads = {}, {}, {}
    for L, i in source_of.items():
        reads[L] = input_norms[L].y[0].to(dtype) if L in input_norms else mlp_in[L]  # the norm's own clean output
        pre[L] = tc.pre_activation(i, reads[L])
        feats[L] = tc.activate(i, pre[L])
    decoded = tc.decode([feats.get(next((L for L, s in source_of.items() if s == i), -1)) for i in range(tc.n)])
    recon = {L: decoded[j] for L, j in output_of.items()}
    skip_clean = {}
    if tc.W_skip is not None:
        for L, j in output_of.items():
            src = next((S for S, i in source_of.items() if i == j), None)
            if src is not None:
                skip_clean[L] = tc.skip(j, reads[src])
                recon[L] = recon[L] + skip_clean[L]
    error = {L: mlp_out[L] - recon[L] if L in recon else mlp_out[L].clone() for L in layers}
    return CleanState(
        m=m, tc=tc, inputs=prepared, layers=layers, source_of=source_of, output_of=output_of,
        embed=cache["embed"][0].to(dtype), mlp_in=mlp_in, mlp_out=mlp_out,
        patterns={L: cache[f"attn_pattern.{L}"][:1].detach() for L in layers}, logits=cache["logits"][0],
        pre=pre, features=feats, recon=recon, error=error, norms=norms, input_norms=input_norms,
        skip_clean=skip_clean,
    )


def _add(base: torch.Tensor, extra: "torch.Tensor | None"):
    def fn(x):
        out = base.to(x.dtype).expand_as(x)
        return out if extra is None else out + extra.to(x.dtype)
    return Fn(fn)


def _skip_reads(state: CleanState, reads: "dict[int, torch.Tensor]") -> list[Bound]:
    """Bounds at the inputs a skip transcoder's terms read, keeping this forward's transcoder input in ``reads``."""
    def keep(L: int):
        def fn(x):
            reads[L] = state.transcoder_input(L, x)
            return x
        return Fn(fn)

    sources = {state.skip_source(L) for L in state.layers} - {None}
    return [Bound(Site.parse(f"mlp_in.{L}"), keep(L)) for L in sorted(sources)]


def direct_run(
    state: CleanState,
    *,
    rows: int = 1,
    embed_delta: "torch.Tensor | None" = None,
    mlp_delta: "dict[int, torch.Tensor] | None" = None,
    capture: Sequence[str] = (),
    grad: bool = False,
    freeze_attention: bool = True,
) -> Run:
    """The frozen model with every MLP output held at its clean value (plus ``mlp_delta[L]``,
    ``[rows, pos, d]``) and the embeddings at theirs (plus ``embed_delta``): what edges differentiate.
    A skip transcoder's term follows this forward's input (its change from the clean one is added)."""
    mlp_delta = mlp_delta or {}
    bounds = [Bound(Site.parse("embed"), _add(state.embed, embed_delta))]
    reads: dict[int, torch.Tensor] = {}
    bounds += _skip_reads(state, reads)

    def held(L: int):
        base, extra = state.mlp_out[L], mlp_delta.get(L)
        if L not in state.skip_clean:
            return _add(base, extra)
        base = base - state.skip_clean[L]  # all but the skip term, which this forward recomputes

        def fn(x):
            out = base.to(x.dtype) + state.skip_term(L, reads, x.dtype)
            return out if extra is None else out + extra.to(x.dtype)
        return Fn(fn)

    bounds += [Bound(Site.parse(f"mlp_out.{L}"), held(L)) for L in state.layers]
    if freeze_attention:
        bounds += pattern_bounds(state.layers, state.patterns)
    with state.norms.frozen():
        return state.m.run(state.rows(rows), bounds, capture=list(capture), grad=grad)


def replacement_run(
    state: CleanState,
    *,
    inputs: Any = None,
    feature_edits: "dict[int, torch.Tensor] | None" = None,
    capture: Sequence[str] = (),
) -> Run:
    """The local replacement model: frozen patterns and norms, each MLP output the transcoder's decoding
    of features ``mask_clean * pre(mlp_in)`` computed in this forward, plus the clean error.
    ``feature_edits[L]`` (``[rows, pos, n_features]``) is added to source ``L``'s features."""
    tc, feature_edits = state.tc, feature_edits or {}
    stash: dict[int, torch.Tensor] = {}
    masks = {L: (f != 0) for L, f in state.features.items()}

    reads: dict[int, torch.Tensor] = {}

    def read(L: int):
        def fn(x):
            reads[L] = state.transcoder_input(L, x)
            f = masks[L].to(x.dtype) * tc.pre_activation(state.source_of[L], reads[L])
            stash[L] = f + feature_edits[L].to(f.dtype) if L in feature_edits else f
            return x
        return Fn(fn)

    def write(L: int):
        def fn(x):
            out = state.error[L].to(x.dtype).expand_as(x)
            if L in state.output_of:
                j = state.output_of[L]
                out = out + tc.b_dec[j].to(x.dtype)
                for src, i in state.source_of.items():
                    if j in tc.outputs_of(i):
                        out = out + stash[src].to(x.dtype) @ tc.decoder(i, j).to(x.dtype)
                skip = state.skip_term(L, reads, x.dtype)
                out = out if skip is None else out + skip
            return out
        return Fn(fn)

    bounds = [Bound(Site.parse(f"mlp_in.{L}"), read(L)) for L in state.source_of]
    bounds += [Bound(Site.parse(f"mlp_out.{L}"), write(L)) for L in state.layers]
    bounds += pattern_bounds(state.layers, state.patterns)
    with state.norms.frozen():
        return state.m.run(state.inputs if inputs is None else inputs, bounds, capture=list(capture))
