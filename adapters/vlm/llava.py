"""LLaVA-style models: a vision tower, a projector and a decoder LM, laid out as ``model.vision_tower``,
``model.multi_modal_projector``, ``model.language_model`` (``LlavaForConditionalGeneration`` with a CLIP tower,
``PaliGemmaForConditionalGeneration`` with a SigLIP tower and a Gemma LM whose prefix attends both ways) or
as ``model.vision_model``, ``model.connector``, ``model.text_model`` (``Idefics3ForConditionalGeneration``,
SmolVLM: a SigLIP-style tower and a pixel-shuffle connector).

The families come from the code that serves each part alone, so they hold the same values:

- ``vision.*``: the vision tower under the names of the CLIP adapter (:mod:`crosspatch.adapters.transformers.clip`),
  exact per head (``vision.head_out`` + the output bias = ``vision.attn_out``); their batch is the images,
  one per row. ``vision.logits_in`` (CLIP's pooled readout) is left out: the projector reads the
  feature layer's positions, not a pooled token.
- ``projector_out``: the projected image features ``[images, pos, d_text]``, before they replace the
  image-token embeddings.
- the language model's families, built by the transformers adapter's table or inference for the LM
  alone (``resid_pre``, ``head_out``, ``attn_pattern``, ``head_in`` ...), ``embed`` being the merged
  embeddings the first block reads (image features in the image positions), and ``logits``.
"""

from __future__ import annotations

import warnings
from dataclasses import replace

import torch
from torch import nn

from crosspatch.engine.reach import ModuleInput, ModuleOutput, installing, submodule, temporarily
from crosspatch.sites.catalog import Axis, Catalog, SiteFamily

from crosspatch.adapters.transformers.adapter import InferenceWarning, TransformersAdapter
from crosspatch.adapters.transformers.clip import _tower_families
from crosspatch.adapters.transformers.reaches import AttentionPattern

__all__ = ["is_served", "catalog", "parts", "example_inputs", "image_tokens", "images_per_row_axis"]

# (vision tower, projector, language model) attribute names of the base model, per layout.
_LAYOUTS = (("vision_tower", "multi_modal_projector", "language_model"), ("vision_model", "connector", "text_model"))

_LM_SKIP = ("embed",)  # replaced: the LM's embed_tokens runs before the image features are merged in


def _layout(model: nn.Module) -> tuple[str, str, str] | None:
    base = getattr(model, "model", None)
    return next((names for names in _LAYOUTS if all(hasattr(base, n) for n in names)), None)


def is_served(model: nn.Module) -> bool:
    return _layout(model) is not None and hasattr(model, "lm_head")


def parts(model: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(vision tower, projector, language model) of a served model."""
    return tuple(getattr(model.model, name) for name in _layout(model))  # type: ignore[return-value]


def images_per_row_axis(model: nn.Module) -> bool:
    """Whether the model takes ``pixel_values`` as ``[rows, images, 3, H, W]`` (Idefics3) rather than ``[rows, 3, H, W]``."""
    return _layout(model) == _LAYOUTS[1]


class _Shell(nn.Module):
    """Holds the vision tower under the attribute the CLIP families are written against (``vision_model``),
    without copying or moving it: hooks land on the tower's own modules."""

    def __init__(self, tower: nn.Module):
        super().__init__()
        self.vision_model = tower


class OutputFirst:
    """A module's output (element 0 of a tuple), hooked ahead of the hooks already there.

    transformers records the vision tower's hidden states with forward hooks of its own on each block; the
    projector reads the last one from that record. Hooked first, a write to the block's output is what
    the record holds, so it reaches the projector."""

    def __init__(self, root: nn.Module, path: str):
        self.root, self.path = root, path

    def install(self, layer: int | None, callback) -> list:
        def hook(module, args, output):
            value = output if isinstance(output, torch.Tensor) else output[0]
            new = callback(value)
            if new is None:
                return None
            return new if isinstance(output, torch.Tensor) else (new, *output[1:])

        with installing() as changes:
            changes.forward_hook(submodule(self.root, self.path, layer), hook, prepend=True)
            return changes.handles


class LogitsField:
    """The ``logits`` field of the top-level model's output, read and written by a forward hook."""

    def __init__(self, root: nn.Module):
        self.root = root

    def install(self, layer: int | None, callback) -> list:
        def hook(module, args, output):
            new = callback(output["logits"])
            if new is None:
                return None
            output["logits"] = new
            return output

        with installing() as changes:
            changes.forward_hook(self.root, hook)
            return changes.handles



def _has_class_token(tower: nn.Module) -> bool:
    return hasattr(tower, "pre_layrnorm")  # CLIP's tower has a class token and a pre-norm; SigLIP's neither


def image_tokens(model: nn.Module) -> int:
    """Image tokens per image: the patches, plus the class token when the projector keeps it."""
    config = model.config
    vision = config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    if images_per_row_axis(model):  # the connector folds scale_factor**2 patches into one token
        return patches // int(config.scale_factor) ** 2
    if not _has_class_token(parts(model)[0]):
        return patches
    return patches if getattr(config, "vision_feature_select_strategy", "default") == "default" else patches + 1


def install_output_recorders(model: nn.Module) -> None:
    """Install now the hooks transformers installs on a model's first forward to record hidden states (the
    projector reads the vision tower's through them). Installed inside a run, they would count as hooks
    that run left behind, and removing them would leave the tower without hidden states."""
    try:
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY, maybe_install_capturing_hooks
    except ImportError:  # a transformers that records hidden states without hooks
        return
    for module in model.modules():
        if _CAN_RECORD_REGISTRY.get(module):
            maybe_install_capturing_hooks(module)


def feature_blocks(model: nn.Module) -> int:
    """How many vision blocks reach the projector: those up to the hidden state it reads
    (``vision_feature_layer``; PaliGemma and Idefics3 read the last block's output, post-normed)."""
    n_vision = len(parts(model)[0].encoder.layers)
    layer = getattr(model.config, "vision_feature_layer", -1)
    if not isinstance(layer, int):
        raise NotImplementedError(
            f"{type(model).__name__} concatenates vision hidden states {list(layer)}; one feature layer is served"
        )
    if not -(n_vision + 1) <= layer <= n_vision:
        raise ValueError(f"vision_feature_layer {layer} is out of range for {n_vision} vision blocks")
    used = layer % (n_vision + 1)  # hidden state k is the output of block k - 1 (0: the embeddings)
    if used == 0:
        raise NotImplementedError(f"{type(model).__name__} reads the vision embeddings only; no vision block reaches it")
    return used


def catalog(model: nn.Module) -> Catalog:
    tower, projector, lm = parts(model)
    install_output_recorders(model)
    config = model.config
    used = feature_blocks(model)
    shell = _Shell(tower)
    vision = [f for f in _tower_families(shell, "vision") if f.name != "vision.logits_in"]
    # Blocks after the feature layer never reach the output (LLaVA reads hidden state -2): not served.
    vision = [replace(f, layers=used) if f.layers is not None else f for f in vision]
    vision = [replace(f, reach=OutputFirst(shell, "vision_model.encoder.layers.{layer}")) if f.name == "vision.resid_post"
              else f for f in vision]
    if not _has_class_token(tower):  # SigLIP: the patch embeddings enter the first block as they are
        vision = [replace(f, reach=ModuleOutput(shell, "vision_model.embeddings"), doc="patch embeddings entering the first block")
                  if f.name == "vision.embed" else f for f in vision]
    with warnings.catch_warnings(record=True) as caught:  # said once below, for what stays unserved
        warnings.simplefilter("always", InferenceWarning)
        text = TransformersAdapter().catalog(lm)
    for w in caught:
        if not issubclass(w.category, InferenceWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    d_text = config.text_config.hidden_size
    pos, dim = Axis("pos"), Axis("dim", d_text)
    families = vision + [
        SiteFamily("projector_out", (Axis("pos", image_tokens(model)), dim), ModuleOutput(projector, ""),
                   doc="projected image features, one per image token (before they replace the image-token embeddings)"),
        SiteFamily("embed", (pos, dim), ModuleInput(lm, "layers.0"),
                   doc="token embeddings with the projected image features in the image positions (what block 0 reads)"),
    ]
    unavailable = dict(text.unavailable)
    lm_families = [f for f in text if f.name not in _LM_SKIP]
    if "attn_pattern" in unavailable:
        pattern, why = _pattern_in_context(model, lm)
        if pattern is not None:
            del unavailable["attn_pattern"]
            lm_families.insert([f.name for f in lm_families].index("resid_pre") + 1, pattern)
        else:
            unavailable["attn_pattern"] = why
    families += lm_families
    if unavailable:
        warnings.warn(f"{type(model).__name__}: language-model families not served: "
                      + "; ".join(f"{name} ({why})" for name, why in unavailable.items()), InferenceWarning, stacklevel=3)
    families.append(SiteFamily("logits", (pos, Axis("vocab", model.lm_head.weight.shape[0])), LogitsField(model),
                               doc="next-token logits"))
    return Catalog(families, type(model).__name__, unavailable=unavailable)


def example_inputs(model: nn.Module, rows: int = 2, text: int = 5, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded inputs ``[image tokens, bos, text ...]`` (one image per row) at the config's image size."""
    config = model.config
    vision = config.vision_config
    token = getattr(config, "image_token_id", getattr(config, "image_token_index", None))
    g = torch.Generator().manual_seed(seed)
    vocab = config.text_config.vocab_size
    words = torch.randint(3, max(4, min(vocab, 1000)), (rows, text), generator=g)
    words[words == token] = 3
    ids = torch.cat([torch.full((rows, image_tokens(model)), token), torch.ones(rows, 1, dtype=torch.long), words], 1)
    pixels = torch.randn(rows, vision.num_channels, vision.image_size, vision.image_size, generator=g)
    pixels = pixels.to(parts(model)[0].embeddings.patch_embedding.weight.dtype)
    if images_per_row_axis(model):
        pixels = pixels.unsqueeze(1)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}
    if model.config.model_type == "paligemma":
        out["token_type_ids"] = torch.zeros_like(ids)
    device = model.lm_head.weight.device
    return {k: v.to(device) for k, v in out.items()}


def _pattern_in_context(model: nn.Module, lm: nn.Module) -> tuple[SiteFamily | None, str]:
    """The LM's ``attn_pattern`` family, proved inside the whole model when the LM alone failed its proof
    (PaliGemma's text config asks for a bidirectional mask that only the whole model builds right): the
    output with every layer's pattern read through crosspatch's eager attention must equal the plain one."""
    config = lm.config
    heads = config.num_attention_heads
    family = SiteFamily("attn_pattern", (Axis("head", heads), Axis("pos"), Axis("key_pos")),
                        AttentionPattern(lm, "layers.{layer}.self_attn", config), len(lm.layers),
                        "attention probabilities (query pos, key pos)")
    inputs = example_inputs(model)
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
