"""Which modules serve each site family of one model: the hand-written table for the families it
lists, else inference (:mod:`.infer`) followed by its proof on the model (:mod:`.proof`).

Looked up once per model object and kept while the model lives.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from .architectures import ARCHITECTURES, Architecture, architecture_for
from .examples import example_inputs, forward_kwargs, takes_images
from .infer import InferenceError, has_submodule, infer
from .inputs import LAYOUTS, InputLayout

__all__ = ["Mapping", "mapping_for"]


@dataclass(frozen=True)
class Mapping:
    """An Architecture, its receiver-input layout, and where it came from."""

    arch: Architecture | None
    layout: InputLayout | None = None
    inferred: bool = False
    notes: dict[str, str] = field(default_factory=dict)  # family -> why it is not served
    error: str | None = None  # why no Architecture at all
    positions: int | None = None  # a vision encoder's positions at the config's image size (the pos axis)
    n_heads: int | None = None  # the heads inference read off the pattern; None: the config's


_MAPPINGS: "weakref.WeakKeyDictionary[nn.Module, Mapping]" = weakref.WeakKeyDictionary()


def mapping_for(model: nn.Module) -> Mapping:
    """The table's mapping for ``model.config.model_type``, else the inferred one (or the reason there is none)."""
    found = _MAPPINGS.get(model)
    if found is None:
        arch = architecture_for(model.config)
        if arch is not None:
            found = Mapping(arch, LAYOUTS.get(model.config.model_type))
        else:
            try:
                inferred = infer(model)
            except InferenceError as exc:
                found = _by_structure(model) or Mapping(None, error=str(exc))
            else:
                found = Mapping(inferred.arch, inferred.layout, True, dict(inferred.notes), positions=inferred.positions,
                                n_heads=inferred.n_heads)
        if found.arch is not None and found.positions is None and takes_images(model):
            found = replace(found, positions=_positions(model, found.arch))
        _MAPPINGS[model] = found
    return found


def _positions(model: nn.Module, arch: Architecture) -> int:
    """How many positions the first block of a vision encoder reads for an image of the config's size."""
    seen: list[int] = []
    block = model.base_model.get_submodule(arch.layers)[0]
    handle = block.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((args[0] if args else kwargs["hidden_states"]).shape[1]), with_kwargs=True
    )
    try:
        with torch.no_grad():
            model(**forward_kwargs(model, example_inputs(model, rows=1)))
    finally:
        handle.remove()
    return seen[0]


def _by_structure(model: nn.Module) -> Mapping | None:
    """The first table layout whose every module path exists in ``model`` (BERT's in ELECTRA, CamemBERT,
    ERNIE ...), to be proved like an inferred one; None when no layout fits."""
    base = model.base_model
    for model_type, arch in ARCHITECTURES.items():
        try:
            blocks = base.get_submodule(arch.layers)
            paths = [arch.attn, arch.attn_core, arch.o_proj, arch.mlp, arch.mlp_down]
            paths += [arch.resid_mid] if arch.resid_mid not in (None, "sum") else []
            if arch.embed is not None:
                base.get_submodule(arch.embed)
            for block in blocks:
                for path in paths:
                    block.get_submodule(path)
        except (AttributeError, TypeError):
            continue
        layout = LAYOUTS.get(model_type)
        notes = {}
        if layout is not None and not all(has_submodule(block, p) for block in blocks for p in layout.qkv):
            layout, notes = None, {"head_in": f"the {model_type} layout's query, key and value projections are not all there"}
        return Mapping(arch, layout, True, notes)
    return None

