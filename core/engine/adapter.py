"""The adapter contract: what an architecture plugin provides so the engine can serve a model."""

from __future__ import annotations

from itertools import chain
from typing import TYPE_CHECKING, Any, Mapping

import torch
from torch import nn

from ..sites.catalog import Catalog
from .offload import execution_device

if TYPE_CHECKING:
    from .resume import Prefix, Resume

__all__ = ["Adapter", "AdapterError", "Inputs", "batch_size", "repeat_rows", "model_device"]

Inputs = dict[str, torch.Tensor]


class AdapterError(TypeError):
    """No adapter serves a model, or an adapter cannot serve this one."""


class Adapter:
    """Maps one architecture family onto the site vocabulary.

    Subclasses set ``name`` and implement :meth:`matches`, :meth:`catalog`, :meth:`prepare`,
    :meth:`forward` and :meth:`output`. Register an instance with the ``register_adapters`` hook.

    ``fallback = True`` marks an adapter that serves any model (it matches everything): ``wrap`` asks
    it only after every other adapter declined, so it never shadows one written for the model.
    ``specific = True`` marks an adapter for a subset of what a broader one also matches (the VLM
    adapter's models are transformers models too): ``wrap`` asks it first.
    """

    name: str = ""
    fallback: bool = False
    specific: bool = False

    def matches(self, model: nn.Module) -> bool:
        """True when this adapter is meant for ``model``. Must not import heavy libraries."""
        raise NotImplementedError

    def catalog(self, model: nn.Module) -> Catalog:
        """Every site family of ``model`` with its axes, sizes and reach."""
        raise NotImplementedError

    def prepare(self, model: nn.Module, inputs: Any) -> Inputs:
        """Normalise user inputs into a dict of batched tensors on the model's device."""
        raise NotImplementedError

    def forward(self, model: nn.Module, inputs: Inputs) -> Any:
        """Run the model on prepared inputs and return its raw output."""
        raise NotImplementedError

    def output(self, raw: Any) -> torch.Tensor:
        """The primary output tensor (logits, reconstruction, embedding) of a raw output."""
        return raw

    def sizes(self, inputs: Inputs) -> dict[str, int]:
        """Sizes of axes that depend on the input (``pos``), for expanding ``*``."""
        return {}

    def describe(self, model: nn.Module) -> dict[str, Any]:
        """A JSON-able summary of the model for result metadata."""
        return {"class": type(model).__name__}

    # Prefix reuse (optional; see crosspatch.resume). An adapter that can start a forward at a
    # later block returns True from can_resume and implements the two methods below.

    def can_resume(self, model: nn.Module) -> bool:
        """True when :meth:`forward_keeping_prefix` and :meth:`resume` serve ``model``."""
        return False

    def forward_keeping_prefix(self, model: nn.Module, inputs: Inputs) -> "tuple[Any, Prefix]":
        """:meth:`forward`, also returning the :class:`~crosspatch.resume.Prefix` later runs resume from.

        Register the hooks it adds for the forward (to record what enters each block) through
        :func:`crosspatch.engine.reach.temporarily`, which registers each one's undo before the hook:
        inside a run the engine holds those undos too, so an interrupt at any line leaves no hook behind.
        """
        raise NotImplementedError(f"the {self.name!r} adapter cannot keep a prefix for resumed runs")

    def resume(self, model: nn.Module, inputs: Inputs, resume: "Resume") -> Any:
        """The raw output of ``inputs`` computed from ``resume.prefix`` at ``resume.layer`` / ``resume.pos``.

        ``inputs`` are the prefix's inputs with their rows repeated; the output covers every position.
        """
        raise NotImplementedError(f"the {self.name!r} adapter cannot resume a forward part-way")

    # Output at one position per row (optional; see crosspatch.output_positions).

    def output_at(self, model: nn.Module, positions: torch.Tensor, keys: set[str]) -> list:
        """Hooks (handles) that make the next forward compute its output at ``positions`` (``[rows]``) only,
        zeros elsewhere; ``[]`` when the adapter cannot. ``keys`` are the site keys the run reads or writes:
        nothing they name may be restricted (their values must stay whole)."""
        return []

    # Gradient runs (optional).

    def gradient_hooks(self, model: nn.Module) -> list:
        """Hooks (handles) for a forward whose gradients will be taken that make its backward cheaper
        without changing any forward value (e.g. one fused node for an activation written as a chain of
        element-wise ops); ``[]`` when there are none."""
        return []

    # Verification (optional): what ``crosspatch verify`` uses beside the conformance suite.

    def example_inputs(self, model: nn.Module) -> Any:
        """Inputs of at least two examples that run ``model``, for checks the user gives no inputs to."""
        raise NotImplementedError(f"the {self.name!r} adapter has no example inputs; pass inputs explicitly")

    def family_oracles(self, model: nn.Module) -> dict[str, tuple[float, "str | None"]]:
        """The adapter's own checks per site family (an arithmetic identity, a hand-written hook):
        ``{family: (largest difference measured, first failure or None)}``; ``{}`` when it has none."""
        return {}

    def tiny_model(self, kind: str) -> nn.Module:
        """A small model with random weights of the named kind (``crosspatch verify --config KIND``)."""
        raise NotImplementedError(f"the {self.name!r} adapter builds no tiny models")

    # Contextual decomposition (optional; see crosspatch.methods.cdt).

    def decomposed_forward(self, model: nn.Module) -> Any:
        """The model's forward over ``(rel, irrel)`` pairs that CD-T runs (a
        :class:`crosspatch.methods.cdt.DecomposedForward`), or None when the adapter has none for ``model``."""
        return None


def batch_size(inputs: Mapping[str, torch.Tensor]) -> int:
    for value in inputs.values():
        if isinstance(value, torch.Tensor):
            return value.shape[0]
    raise ValueError("the inputs hold no tensor, so they have no batch size")


def repeat_rows(inputs: Mapping[str, Any], times: int) -> Inputs:
    """Tile every batched tensor ``times`` along the batch axis (block order: all rows, then again)."""
    if times == 1:
        return dict(inputs)
    return {
        k: v.repeat(times, *([1] * (v.ndim - 1))) if isinstance(v, torch.Tensor) and v.ndim > 0 else v
        for k, v in inputs.items()
    }


def model_device(model: nn.Module) -> torch.device:
    """The device inputs go to: where the model's input embedding computes, never ``meta``.

    For a model dispatched by accelerate (``device_map``, offload) that is the embedding's execution
    device (offloaded weights sit on ``meta`` between forwards, and the first parameter may belong to
    any device of the map); for a model on one device, that device.
    """
    get_embedding = getattr(model, "get_input_embeddings", None)
    try:
        embedding = get_embedding() if callable(get_embedding) else None
    except (NotImplementedError, AttributeError):
        embedding = None
    modules = model.modules() if embedding is None else chain((embedding,), model.modules())
    for module in modules:
        device = execution_device(module)
        if device is not None:
            return device
    return torch.device("cpu")
