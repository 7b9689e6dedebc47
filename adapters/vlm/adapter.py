"""The VLM adapter: generative vision-language models (LLaVA, PaliGemma, Idefics3 / SmolVLM, Gemma 3, Qwen2-VL and
its kin, LLaVA-NeXT) with a position-group axis.

Inputs are what a processor returns, ``{"input_ids", "pixel_values", "attention_mask"?}`` with one image per
row, or ``k`` with ``VLMAdapter(images_per_row=k)`` (:mod:`.several`); PaliGemma adds ``token_type_ids`` (0 on
the prefix), Qwen2-VL ``image_grid_thw`` (:mod:`.qwen2_vl`), LLaVA-NeXT ``image_sizes`` (:mod:`.llava_next`);
plus optionally ``"groups": {"question": (start, stop), ...}`` (:mod:`.groups`).
Prepared inputs carry every group as a mask ``group.<name>`` ``[rows, pos]``; selections name them
through :func:`crosspatch.engine.knockout.bind` (``resid_pre.3[pos=image]``).
"""

from __future__ import annotations

import sys
import weakref
from typing import Any, Mapping, Protocol

import torch
from torch import nn

from crosspatch.engine.adapter import Adapter, AdapterError, Inputs, model_device
from crosspatch.engine.reach import submodule, temporarily
from crosspatch.sites.catalog import Catalog
from crosspatch.sites.selection import GROUP_PREFIX

from . import llava, llava_next, qwen2_vl
from .groups import group_masks
from .qwen2_vision import vision_sizes

__all__ = ["VLMAdapter"]

_MODEL_KEYS = ("input_ids", "pixel_values", "attention_mask", "token_type_ids", "image_grid_thw", "mm_token_type_ids",
               "image_sizes")
_CATALOGS: "weakref.WeakKeyDictionary[nn.Module, dict[int, Catalog]]" = weakref.WeakKeyDictionary()  # per images a row


class _Layout(Protocol):
    """What a layout module (:mod:`.llava`, :mod:`.qwen2_vl`, :mod:`.llava_next`) answers for the adapter."""

    EMBED_IS_PROJECTOR_OUT: bool  # embed at the image positions is projector_out as it is

    def catalog(self, model: nn.Module) -> Catalog: ...

    def with_images(self, model: nn.Module, catalog: Catalog, k: int) -> Catalog: ...

    def prepare_images(self, model: nn.Module, inputs: Mapping[str, Any], ids: torch.Tensor, device: torch.device,
                       k: int = 1) -> dict[str, torch.Tensor]: ...

    def part_groups(self, model: nn.Module, prepared: Mapping[str, torch.Tensor], token: int | None,
                    k: int) -> dict[str, torch.Tensor]: ...

    def forward_kwargs(self, model: nn.Module, inputs: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]: ...

    def describe(self, model: nn.Module) -> dict[str, Any]: ...

    def example_inputs(self, model: nn.Module, *, images: int = 1) -> dict[str, torch.Tensor]: ...


class VLMAdapter(Adapter):
    """LLaVA-style models (a CLIP- or SigLIP-style tower, a projector, a language model: :mod:`.llava`),
    Qwen2-VL-style models (:mod:`.qwen2_vl`) and LLaVA-NeXT (:mod:`.llava_next`)."""

    name = "vlm"
    specific = True  # its models are PreTrainedModels, which the transformers adapter also matches

    def __init__(self, images_per_row: int = 1):
        """``images_per_row``: images each row holds (LLaVA-style models); above 1, the tower's and the
        projector's families gain an axis ``image`` (:mod:`.several`)."""
        if not isinstance(images_per_row, int) or images_per_row < 1:
            raise ValueError(f"images_per_row is a positive int, got {images_per_row!r}")
        self.images_per_row = images_per_row

    def matches(self, model: nn.Module) -> bool:
        transformers = sys.modules.get("transformers")
        return transformers is not None and isinstance(model, transformers.PreTrainedModel) and _served(model)

    def catalog(self, model: nn.Module) -> Catalog:
        if not _served(model):
            raise AdapterError(
                f"the vlm adapter serves LLaVA-style models (model.vision_tower, model.multi_modal_projector, "
                f"model.language_model; or model.vision_model, model.connector, model.text_model) or Qwen2-VL "
                f"(model.visual, model.language_model), with an lm_head; "
                f"{type(model).__name__} is not one"
            )
        k = self.images_per_row
        per_model = _CATALOGS.setdefault(model, {})
        if 1 not in per_model:
            per_model[1] = _kind(model).catalog(model)
        if k not in per_model:  # LLaVA-NeXT: k tower images a row are the whole image and its crops
            per_model[k] = _kind(model).with_images(model, per_model[1], k)
        return per_model[k]

    def prepare(self, model: nn.Module, inputs: Any) -> Inputs:
        if not isinstance(inputs, Mapping) or "input_ids" not in inputs:
            raise ValueError(
                "VLM inputs are what the processor returns: a dict with 'input_ids' [rows, pos], 'pixel_values' "
                "[rows, 3, H, W] (one image per row) and optionally 'attention_mask' and 'groups' "
                "({'question': (start, stop)})"
            )
        unknown = sorted(k for k in inputs if k not in _MODEL_KEYS and k != "groups" and not str(k).startswith(GROUP_PREFIX))
        if unknown:
            raise ValueError(f"unknown VLM input keys {unknown}; expected {', '.join(_MODEL_KEYS)} and 'groups'")
        device = model_device(model)
        ids = torch.as_tensor(inputs["input_ids"])
        ids = (ids.unsqueeze(0) if ids.ndim == 1 else ids).to(device=device, dtype=torch.long)
        out: dict[str, Any] = {"input_ids": ids}
        if inputs.get("attention_mask") is not None:
            mask = torch.as_tensor(inputs["attention_mask"])
            out["attention_mask"] = (mask.unsqueeze(0) if mask.ndim == 1 else mask).to(device=device, dtype=torch.long)
        if inputs.get("token_type_ids") is not None:  # PaliGemma: 0 marks the prefix (attended both ways)
            types = torch.as_tensor(inputs["token_type_ids"])
            out["token_type_ids"] = (types.unsqueeze(0) if types.ndim == 1 else types).to(device=device, dtype=torch.long)
        layout = _kind(model)
        out.update(layout.prepare_images(model, inputs, ids, device, self.images_per_row))
        carried = {k: v for k, v in inputs.items() if str(k).startswith(GROUP_PREFIX)}
        if carried:  # prepared already: keep the groups as they are (they follow the rows when tiled)
            out.update({k: v.to(device) for k, v in carried.items()})
        else:
            token = getattr(model.config, "image_token_id", getattr(model.config, "image_token_index", None))
            prefix = out.get("token_type_ids") if model.config.model_type == "paligemma" else None  # Gemma 3's mark images
            out.update(group_masks(ids, out.get("attention_mask"), token, inputs.get("groups"), prefix))
            more = layout.part_groups(model, out, token, self.images_per_row)  # each image's or crop's tokens
            out.update({GROUP_PREFIX + k: v for k, v in more.items()})
        return out

    def forward(self, model: nn.Module, inputs: Inputs) -> Any:
        kwargs = _kind(model).forward_kwargs(model, {k: v for k, v in inputs.items() if k in _MODEL_KEYS}, self.images_per_row)
        return model(**kwargs, use_cache=False, return_dict=True)

    def output(self, raw: Any) -> torch.Tensor:
        return raw.logits

    def sizes(self, inputs: Inputs) -> dict[str, int]:
        n = inputs["input_ids"].shape[1]
        return {"pos": n, "key_pos": n, **vision_sizes(inputs, self.images_per_row)}

    def describe(self, model: nn.Module) -> dict[str, Any]:
        return _kind(model).describe(model)

    # -- verification: crosspatch verify ----------------------------------------------------------

    def example_inputs(self, model: nn.Module) -> Any:
        return _kind(model).example_inputs(model, images=self.images_per_row)

    def tiny_model(self, kind: str) -> nn.Module:
        """A tiny random ``llava``, ``paligemma``, ``idefics3``, ``qwen2_vl`` or ``llava_next`` (:mod:`.tiny`)."""
        from .tiny import tiny_model

        return tiny_model(kind)

    def family_oracles(self, model: nn.Module) -> dict[str, tuple[float, str | None]]:
        """Per-head sums against the output projection they split (vision heads of the last served block,
        language heads of block 0: heads + the projection's bias = its output, read by a plain forward hook),
        and ``embed`` at the image positions against ``projector_out``."""
        from crosspatch.engine.model import WrappedModel

        m = WrappedModel(model, self)
        inputs = m.prepare(self.example_inputs(model))
        families = m.catalog.families
        last_vision = families["vision.head_out"].layers - 1 if "vision.head_out" in families else 0
        sites = {"vision.head_out": (f"vision.head_out.{last_vision}", last_vision), "head_out": ("head_out.0", 0)}
        sites = {name: site for name, site in sites.items() if name in families}  # the LM or the tower may be unserved
        # embed at the image positions against projector_out where the layout puts the features in as they are
        merged = ["embed", "projector_out"] if "projector_out" in families and _kind(model).EMBED_IS_PROJECTOR_OUT else []
        projections = {name: _projection(m.catalog.family(name).reach, layer) for name, (_, layer) in sites.items()}
        outputs: dict[str, torch.Tensor] = {}
        with temporarily() as changes:
            for name, module in projections.items():
                changes.forward_hook(module, lambda mod, args, out, name=name: outputs.__setitem__(name, out.detach()))
            cache = m.run(inputs, capture=[*merged, *(key for key, _ in sites.values())]).cache
        with torch.no_grad():
            scale = lambda t: float(t.abs().max()) or 1.0  # noqa: E731
            out: dict[str, tuple[float, str | None]] = {}
            for name, (key, _) in sites.items():
                bias = projections[name].bias
                axis = 1 + families[name].axis_names.index("head")  # after the rows (and the image of a row)
                heads = cache[key].sum(axis) + (0 if bias is None else bias)
                target = outputs[name].reshape(heads.shape)
                out[name] = _verdict(float((heads - target).abs().max()) / scale(target),
                                     f"{name} summed over heads (+ the projection's bias) differs from the projection's output")
            if merged:
                image = cache["embed"][inputs[GROUP_PREFIX + "image"]].view_as(cache["projector_out"])
                err = float((image - cache["projector_out"]).abs().max()) / scale(cache["projector_out"])
                out["embed"] = _verdict(err, "embed at the image positions differs from projector_out")
        return out


def _projection(reach: Any, layer: int) -> nn.Module:
    """The output projection a per-head family splits (:class:`HeadOut`, or :class:`FlatHeadOut` around one;
    per image of a row, :class:`~.several.ImagesOfRow` around either)."""
    while hasattr(reach, "inner"):
        reach = reach.inner
    heads = getattr(reach, "heads", reach)
    return submodule(heads.root, heads.path, layer)


def _served(model: nn.Module) -> bool:
    return llava.is_served(model) or qwen2_vl.is_served(model)


def _kind(model: nn.Module) -> _Layout:
    """The module serving ``model``'s layout: :mod:`.qwen2_vl`, :mod:`.llava_next` or :mod:`.llava`."""
    return qwen2_vl if qwen2_vl.is_served(model) else llava_next if llava_next.is_anyres(model) else llava


def _verdict(err: float, what: str) -> tuple[float, str | None]:
    return err, None if err <= 1e-5 else f"{what} by {err:.3g} (relative)"
