"""The adapter: tells crosspatch where the sites of :class:`MLPClassifier` live.

Sites (``L`` is the block index):

============  ========  =========================================
family        axes      what
============  ========  =========================================
hidden_in.L   neuron    what block L reads
hidden.L      neuron    what block L returns (after its ReLU)
logits        class     the output
============  ========  =========================================

An adapter implements five methods (``matches``, ``catalog``, ``prepare``, ``forward``, ``output``)
and sets ``name``. The catalog lists every site family with its axes (sizes after the batch axis)
and a *reach*: how to hook it. The built-in reaches ``ModuleOutput`` and ``ModuleInput`` cover any
activation that is a module's output or input; write your own only for activations that are not.
"""

from __future__ import annotations

import sys
from typing import Any, Mapping

import torch
from torch import nn

from crosspatch.engine.adapter import Adapter, Inputs, model_device
from crosspatch.sites.catalog import Axis, Catalog, SiteFamily
from crosspatch.engine.reach import ModuleInput, ModuleOutput

__all__ = ["MLPAdapter"]


class MLPAdapter(Adapter):
    # Unique across all installed plugins; users can pick it with cp.wrap(model, adapter="mlp").
    name = "mlp"

    def matches(self, model: nn.Module) -> bool:
        # Called for every model anyone wraps, so it must be cheap and must not import the library
        # it adapts: if the library's module is not imported yet, the model cannot be one of its.
        module = sys.modules.get("crosspatch_template.model")
        return module is not None and isinstance(model, module.MLPClassifier)

    def catalog(self, model: nn.Module) -> Catalog:
        depth = len(model.blocks)
        neuron = Axis("neuron", model.head.in_features)
        families = [
            # "blocks.{layer}" is filled in with the layer index; name=None: the input is positional.
            SiteFamily("hidden_in", (neuron,), ModuleInput(model, "blocks.{layer}", name=None), depth,
                       doc="what block L reads"),
            SiteFamily("hidden", (neuron,), ModuleOutput(model, "blocks.{layer}"), depth,
                       doc="what block L returns (after its ReLU)"),
            SiteFamily("logits", (Axis("class", model.head.out_features),), ModuleOutput(model, "head"),
                       doc="model output"),
        ]
        return Catalog(families, type(model).__name__)

    def prepare(self, model: nn.Module, inputs: Any) -> Inputs:
        # Whatever users pass to m.run(...) -> a dict of batched tensors on the model's device and dtype.
        x = inputs["x"] if isinstance(inputs, Mapping) else inputs
        x = torch.as_tensor(x)
        if x.ndim == 1:
            x = x.unsqueeze(0)
        dtype = model.head.weight.dtype if x.is_floating_point() else x.dtype
        return {"x": x.to(device=model_device(model), dtype=dtype)}

    def forward(self, model: nn.Module, inputs: Inputs) -> Any:
        return model(inputs["x"])

    def output(self, raw: Any) -> torch.Tensor:
        return raw  # the model returns the logits tensor itself

    def describe(self, model: nn.Module) -> dict[str, Any]:
        return {"class": type(model).__name__, "depth": len(model.blocks), "width": model.head.in_features}
