"""The language model's site families inside a vision-language model.

They come from the transformers adapter run on the language model alone (its table, or inference and
proof), with ``embed`` replaced by what the first block reads (the image features merged in) and
``logits`` read off the whole model's output. When the LM alone fails the proof of ``attn_pattern``
(PaliGemma's text config asks for a bidirectional mask that only the whole model builds), the pattern
is proved inside the whole model instead.
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch
from torch import nn

from crosspatch.engine.adapter import AdapterError
from crosspatch.engine.reach import ModuleInput, temporarily
from crosspatch.sites.catalog import Axis, SiteFamily

from crosspatch.adapters.transformers.adapter import InferenceWarning, TransformersAdapter
from crosspatch.adapters.transformers.reaches import AttentionPattern

from .reaches import OutputField

__all__ = ["language_families"]

_LM_SKIP = ("embed",)
_LM_FAMILIES = ("resid_pre", "attn_pattern", "head_out", "attn_out", "mlp_out", "resid_post")  # listed when none is served  # replaced: the LM's embed_tokens runs before the image features are merged in


def language_families(
    model: nn.Module, lm: nn.Module, example: Callable[[], dict[str, torch.Tensor]]
) -> tuple[list[SiteFamily], dict[str, str]]:
    """``embed``, the LM's families and ``logits``, and the LM families not served (with the reason).
    ``example`` gives inputs of the whole model, for the in-context proof of ``attn_pattern``."""
    pos, dim = Axis("pos"), Axis("dim", lm.config.hidden_size)
    families = [SiteFamily("embed", (pos, dim), ModuleInput(lm, "layers.0"),
                           doc="token embeddings with the projected image features in the image positions (what block 0 reads)")]
    logits = SiteFamily("logits", (pos, Axis("vocab", model.lm_head.weight.shape[0])), OutputField(model, "logits"),
                        doc="next-token logits")
    with warnings.catch_warnings(record=True) as caught:  # said once below, for what stays unserved
        warnings.simplefilter("always", InferenceWarning)
        try:
            text = TransformersAdapter().catalog(lm)
        except AdapterError as err:  # the vision tower and the projector are still served
            why = f"the transformers adapter does not serve the language model: {' '.join(str(err).split())}"
            warnings.warn(f"{type(model).__name__}: {why}", InferenceWarning, stacklevel=3)
            return families + [logits], {name: why for name in _LM_FAMILIES}
    for w in caught:
        if not issubclass(w.category, InferenceWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    unavailable = dict(text.unavailable)
    lm_families = [f for f in text if f.name not in _LM_SKIP]
    if "attn_pattern" in unavailable:
        pattern, why = _pattern_in_context(model, lm, example())
        if pattern is not None:
            del unavailable["attn_pattern"]
            lm_families.insert([f.name for f in lm_families].index("resid_pre") + 1, pattern)
        else:
            unavailable["attn_pattern"] = why
    families += lm_families
    if unavailable:
        warnings.warn(f"{type(model).__name__}: language-model families not served: "
                      + "; ".join(f"{name} ({why})" for name, why in unavailable.items()), InferenceWarning, stacklevel=4)
    families.append(logits)
    return families, unavailable


def _pattern_in_context(model: nn.Module, lm: nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[SiteFamily | None, str]:
    """The LM's ``attn_pattern`` family, proved inside the whole model when the LM alone failed its proof
    (PaliGemma's text config asks for a bidirectional mask that only the whole model builds right): the
    output with every layer's pattern read through crosspatch's eager attention must equal the plain one."""
    config = lm.config
    heads = config.num_attention_heads
    family = SiteFamily("attn_pattern", (Axis("head", heads), Axis("pos"), Axis("key_pos")),
                        AttentionPattern(lm, "layers.{layer}.self_attn", config), len(lm.layers),
                        "attention probabilities (query pos, key pos)")
    seen: list[torch.Tensor] = []
    with torch.no_grad():
        plain = model(**inputs, use_cache=False).logits
        with temporarily() as changes:
            for layer in range(len(lm.layers)):
                for handle in family.reach.install(layer, lambda p: seen.append(p) and None):
                    changes.add(handle)
            read = model(**inputs, use_cache=False).logits
    if len(seen) != len(lm.layers):
        return None, f"the eager attention ran in {len(seen)} of {len(lm.layers)} layers"
    sums = max(float((p.sum(-1) - 1).abs().max()) for p in seen)
    diff = float((plain - read).abs().max())
    scale = float(plain.abs().max()) or 1.0
    if diff > 1e-5 * scale or sums > 1e-4:
        return None, f"the eager attention changes the whole model's output by {diff:.3g} (pattern rows sum off by {sums:.3g})"
    return family, ""
