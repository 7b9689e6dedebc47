"""Feature interventions in the real model: set transcoder features to chosen values and run on.

An edit ``(layer, pos, feature, value)`` reads the feature's current activation ``a`` from ``mlp_in.layer``
in the same forward (the transcoder's own encoding of what the model computes there) and adds
``(value - a) * W_dec[feature -> L]`` to every MLP output ``mlp_out.L`` the feature writes (its layer for
a per-layer transcoder, every later one too for a cross-layer one), restricted to ``layers`` when given.
Everything else runs as the model computes it: MLPs stay nonlinear, later features move with the
edit. ``freeze_attention`` holds every attention pattern at the unedited run's. ``pos=None`` edits every
position, which is what :func:`generate` uses for positions that do not exist yet. A transcoder reading
the MLP's normed input encodes the norm of ``mlp_in`` with its own scale (:func:`.normed.live_input`; one
recording forward finds the norm module).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ...engine.forward import Bound, Run
from ...engine.interventions import Fn
from ...engine.model import wrap
from ...sites.site import Site
from ...trainable.transcoder import Transcoder
from .freeze import FrozenNorms, pattern_bounds
from .normed import live_input, mlp_norms
from .replacement import mlp_layers

__all__ = ["FeatureEdit", "feature_intervention", "generate"]


@dataclass(frozen=True)
class FeatureEdit:
    """Set feature ``feature`` of the transcoder source reading ``mlp_in.layer`` to ``value`` at ``pos``
    (an int, a list of ints, or None for every position)."""

    layer: int
    pos: "int | Sequence[int] | None"
    feature: int
    value: float


def _edit_bounds(tc: Transcoder, edits: Sequence[FeatureEdit], layers: "tuple[int, int] | None",
                 n_pos: int, input_norms: "dict | None" = None) -> list[Bound]:
    by_layer: dict[int, list[FeatureEdit]] = {}
    for e in edits:
        by_layer.setdefault(e.layer, []).append(e)
    stash: dict[int, torch.Tensor] = {}
    outputs = {int(Site.parse(s).layer): j for j, s in enumerate(tc.output_sites)}

    def positions(e: FeatureEdit) -> torch.Tensor:
        if e.pos is None:
            return torch.arange(n_pos)
        pos = torch.as_tensor([e.pos] if isinstance(e.pos, int) else list(e.pos))
        return pos % n_pos

    def read(L: int):
        i = tc.layer_of(f"mlp_in.{L}")

        def fn(x):
            with torch.no_grad():
                norm = (input_norms or {}).get(L)
                stash[L] = tc.encode(i, x if norm is None else live_input(norm, x))  # [rows, pos, n_features]
            return x
        return Fn(fn)

    def write(W: int):
        j = outputs[W]

        def fn(x):
            out = x
            for L, group in by_layer.items():
                i = tc.layer_of(f"mlp_in.{L}")
                if j not in tc.outputs_of(i):
                    continue
                dec = tc.decoder(i, j).detach()
                for e in group:
                    pos = positions(e)
                    delta = (e.value - stash[L][:, pos, e.feature])[..., None] * dec[e.feature].to(x.dtype)
                    out = out.index_add(1, pos.to(x.device), delta.to(x.dtype))
            return out
        return Fn(fn)

    bounds = [Bound(Site.parse(f"mlp_in.{L}"), read(L)) for L in by_layer]
    written = {j for L in by_layer for j in tc.outputs_of(tc.layer_of(f"mlp_in.{L}"))}
    targets = sorted(W for W, j in outputs.items() if j in written)
    if layers is not None:
        targets = [W for W in targets if layers[0] <= W <= layers[1]]
    bounds += [Bound(Site.parse(f"mlp_out.{W}"), write(W)) for W in targets]
    return bounds


def feature_intervention(
    model: Any,
    transcoder: Transcoder,
    inputs: Any,
    edits: Sequence["FeatureEdit | tuple"],
    *,
    freeze_attention: bool = False,
    layers: "tuple[int, int] | None" = None,
    capture: Sequence[str] = (),
) -> Run:
    """Run ``inputs`` with ``edits`` applied (see the module doc); the Run's output is the logits."""
    m = wrap(model)
    edits = [e if isinstance(e, FeatureEdit) else FeatureEdit(*e) for e in edits]
    prepared = m.prepare(inputs)
    n_pos = int(prepared["input_ids"].shape[1])
    input_norms = {}
    if transcoder.normalized_input:  # one recording forward finds the norm each edited layer's MLP reads
        norms = FrozenNorms(m.module)
        with norms.recording():
            cache = m.run(prepared, capture=[f"mlp_in.{e.layer}" for e in edits]).cache
        norms.detach()
        input_norms = mlp_norms(norms, {e.layer: cache[f"mlp_in.{e.layer}"].clone() for e in edits})
    bounds = _edit_bounds(transcoder, edits, layers, n_pos, input_norms)
    if freeze_attention:
        all_layers = mlp_layers(m)
        cache = m.run(prepared, capture=[f"attn_pattern.{L}" for L in all_layers]).cache
        bounds += pattern_bounds(all_layers, {L: cache[f"attn_pattern.{L}"].clone() for L in all_layers})
    return m.run(prepared, bounds, capture=list(capture))


def generate(model: Any, transcoder: Transcoder, prompt: Any, edits: Sequence["FeatureEdit | tuple"], *,
             max_new_tokens: int = 8) -> torch.Tensor:
    """Greedy continuation ``[1, pos + max_new_tokens]`` of one prompt with ``edits`` applied at every step
    (edits with ``pos=None`` reach the new positions too). Attention runs free."""
    m = wrap(model)
    ids = m.prepare(prompt)["input_ids"][:1]
    for _ in range(max_new_tokens):
        logits = feature_intervention(m, transcoder, ids, edits).output
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True).to(ids.device)], 1)
    return ids
