"""The checks of dtype and device: a float64 copy of the model gives float64 outputs and captures, and a
CUDA copy keeps the prepared inputs, the output and every capture on the GPU.

Each runs on a deep copy of the model, so the model under test is never converted; the CUDA check is
skipped, saying so, when no GPU is available (unless the caller forces it with ``cuda=True``).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ..engine.adapter import Inputs
from ..engine.forward import Run
from .runner import Skip, SuiteBase, family_keys, fmt_exc
from .tensors import map_tensors


class DeviceChecks(SuiteBase):
    """The checks dtype and cuda, each on a copy of the model."""

    def _copy_run(self, label: str, model: nn.Module, inputs: Any) -> tuple[Inputs, Run]:
        catalog = self.adapter.catalog(model)
        prepared = self.adapter.prepare(model, inputs)
        keys = [k for fam in self.families for k in family_keys(fam) if fam.name in catalog]
        return prepared, self._execute(label, prepared, capture=keys, model=model, catalog=catalog)

    def check_dtype(self) -> list[str]:
        if not any(p.is_floating_point() for p in self.model.parameters()):
            raise Skip("the model has no floating-point parameters")
        model = copy.deepcopy(self.model).to(torch.float64)
        inputs = map_tensors(self.inputs, lambda t: t.to(torch.float64) if t.is_floating_point() else t)
        try:  # the model alone, without the adapter: some kernels (grouped expert matmuls) take no float64
            with torch.no_grad():
                own = self.adapter.output(self.adapter.forward(model, self.adapter.prepare(model, inputs)))
        except RuntimeError as exc:
            raise Skip(f"the model itself does not run in float64 ({fmt_exc(exc)})") from None
        if isinstance(own, torch.Tensor) and own.is_floating_point() and own.dtype != torch.float64:
            # A model that casts inside (logits upcast to float32, a float32 scan) tells no adapter's cast apart.
            raise Skip(f"the model itself returns {own.dtype} with float64 weights")
        _, run = self._copy_run("a float64 run", model, inputs)
        problems = []
        if run.output.is_floating_point() and run.output.dtype != torch.float64:
            problems.append(f"output: the float64 model returned {run.output.dtype}")
        for key, value in run.cache.items():
            if value.is_floating_point() and value.dtype != torch.float64:
                problems.append(self.about(key, f"{key}: captured as {value.dtype} from a float64 model"))
        return problems

    def check_cuda(self) -> list[str]:
        available = torch.cuda.is_available()
        if self.cuda is False:
            raise Skip("turned off (cuda=False)")
        if not available:
            if self.cuda:
                return ["cuda=True but CUDA is not available"]
            raise Skip("CUDA is not available on this machine; the device sub-check did not run")
        model = copy.deepcopy(self.model).to("cuda")
        prepared, run = self._copy_run("a CUDA run", model, self.inputs)  # inputs stay on the CPU: prepare moves them
        problems = [
            f"prepare(): input {k!r} is on {v.device}, not on the model's device"
            for k, v in prepared.items()
            if isinstance(v, torch.Tensor) and v.device.type != "cuda"
        ]
        if run.output.device.type != "cuda":
            problems.append(f"output: on {run.output.device} for a model on CUDA")
        for key, value in run.cache.items():
            if value.device.type != "cuda":
                problems.append(self.about(key, f"{key}: captured on {value.device} for a model on CUDA"))
        return problems
