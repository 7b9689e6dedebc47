"""Models dispatched by accelerate (``device_map``, CPU or disk offload): where a module runs, and its weights.

accelerate wraps a dispatched module's ``forward`` (its ``_hf_hook``): the hook moves the inputs to the
module's *execution device*, and for an offloaded module loads the weights there before the forward and
puts them back on the ``meta`` device after it. Hooks registered with ``register_forward_hook`` run
outside that wrapper, so a reach that reads a module's weights in a hook (a per-head view multiplies
by the output projection) must load them itself: :func:`reads_weights` does, and nothing else changes
for a model that is not offloaded. accelerate is never imported here unless a module carries its hook.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from itertools import chain
from typing import Any, Callable, Iterator

import torch
from torch import nn

__all__ = ["execution_device", "is_offloaded", "onloaded", "reads_weights"]


def _hooks(module: nn.Module) -> list[Any]:
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    return list(getattr(hook, "hooks", (hook,)))  # a SequentialHook holds several


def execution_device(module: nn.Module) -> torch.device | None:
    """The device ``module`` computes on: its accelerate hook's execution device, else where its
    parameters (or buffers) are; ``None`` when it holds none (or only ``meta`` tensors and no hook)."""
    for hook in _hooks(module):
        device = getattr(hook, "execution_device", None)
        if device is not None:
            return torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    for tensor in chain(module.parameters(), module.buffers()):
        if tensor.device.type != "meta":
            return tensor.device
    return None


def is_offloaded(module: nn.Module) -> bool:
    """True when accelerate holds ``module``'s own weights off-device and loads them only for its forward."""
    return any(getattr(hook, "offload", False) for hook in _hooks(module))


@contextmanager
def onloaded(*modules: nn.Module) -> Iterator[None]:
    """Within the block, the parameters of offloaded ``modules`` are on their execution device."""
    with ExitStack() as stack:
        for module in modules:
            if is_offloaded(module):
                from accelerate.utils import align_module_device

                stack.enter_context(align_module_device(module))
            missing = [n for n, p in module.named_parameters(recurse=False) if p.device.type == "meta"]
            if missing and getattr(execution_device(module), "type", None) != "meta":
                raise RuntimeError(
                    f"{type(module).__name__}'s parameters {missing} are on the meta device and no accelerate hook on "
                    f"it loads them; crosspatch reads them through the module's own AlignDevicesHook (offload=True), "
                    f"which accelerate attaches per module unless preload_module_classes covers it"
                )
        yield


def reads_weights(hook: Callable, *others: nn.Module) -> Callable:
    """``hook`` (a forward or forward-pre hook) run with the hooked module's and ``others``' weights on
    their execution device. For modules that are not offloaded this costs one check of their parameters."""

    def wrapped(module: nn.Module, *args: Any) -> Any:
        with onloaded(module, *others):
            return hook(module, *args)

    return wrapped
