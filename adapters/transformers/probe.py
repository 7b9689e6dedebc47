"""One probe forward for architecture inference (:mod:`.infer`): what flowed in and out of given modules.

For every hooked module it keeps its first tensor input and first tensor output (copies: a later
in-place add must not change them) and the first input's parameter name, the tensor arguments beside
the first as wide as the residual ``[batch, pos, width]``, by parameter name (where a block hands a
branch the residual it adds: BLOOM), and how often it ran.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["Flow", "probe", "same", "first_tensor"]


def first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    if hasattr(value, "to_tuple"):
        return first_tensor(value.to_tuple())
    return None


def same(a: torch.Tensor | None, b: torch.Tensor | None, atol: float = 1e-5) -> bool:
    """Equal within ``atol`` (and a relative 1e-4); with ``atol=0``, the same numbers (a tensor handed on)."""
    if a is None or b is None or a.shape != b.shape:
        return False
    if atol == 0:
        return a is b or torch.equal(a, b)
    return a is b or bool(torch.allclose(a.float(), b.float(), atol=atol, rtol=1e-4))


@dataclass
class Flow:
    """First tensor input and output of every hooked module in one forward, and how often each ran."""

    inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)
    beside: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # name -> {argument: tensor}
    first: dict[str, str] = field(default_factory=dict)  # name -> the parameter name of its first input
    mutated: set[str] = field(default_factory=set)  # modules whose output the model changed in place after they returned


def _positional(module: nn.Module) -> list[str]:
    """The names ``module.forward`` gives its positional arguments, in order."""
    params = inspect.signature(module.forward).parameters.values()
    return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _beside(module: nn.Module, args: tuple, kwargs: dict, x: torch.Tensor, width: int) -> dict[str, torch.Tensor]:
    """Tensor arguments other than the first that are as wide as the residual, by parameter name."""
    wide = lambda v: v is not x and isinstance(v, torch.Tensor) and v.ndim == 3 and v.shape[-1] == width  # noqa: E731
    found = {k: v for k, v in kwargs.items() if wide(v)}
    shaped = [i for i, a in enumerate(args) if wide(a)]
    if shaped:
        names = _positional(module)
        found.update({names[i]: args[i] for i in shaped if i < len(names)})
    return {k: v.detach().clone() for k, v in found.items()}


def probe(model: nn.Module, modules: dict[str, nn.Module], inputs: dict[str, Any], width: int) -> Flow:
    """``model(**inputs)`` once without gradients, with hooks on ``modules`` (removed after); ``width``
    is the residual's, for the arguments beside the first that are kept."""
    flow, handles = Flow(), []
    handed: dict[str, tuple[torch.Tensor, int]] = {}  # name -> (its output, the output's version when returned)

    def hooks(name: str):
        def before(module, args, kwargs):
            x = args[0] if args and isinstance(args[0], torch.Tensor) else kwargs.get("hidden_states")
            flow.calls[name] = flow.calls.get(name, 0) + 1
            if isinstance(x, torch.Tensor) and name not in flow.inputs:
                flow.inputs[name] = x.detach().clone()
                flow.beside[name] = _beside(module, args, kwargs, x, width)
                names = _positional(module) if x is not kwargs.get("hidden_states") else []
                flow.first[name] = names[0] if names else "hidden_states"

        def after(module, args, kwargs, output):
            y = first_tensor(output)
            if y is not None and name not in flow.outputs:
                flow.outputs[name] = y.detach().clone()
                handed[name] = (y, y._version)

        return before, after

    try:
        for name, module in modules.items():
            before, after = hooks(name)
            handles.append(module.register_forward_pre_hook(before, with_kwargs=True))
            handles.append(module.register_forward_hook(after, with_kwargs=True))
        with torch.no_grad():
            model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    flow.mutated = {name for name, (y, version) in handed.items() if y._version != version}
    return flow
