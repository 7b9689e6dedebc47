"""One forward that shows what every module reads and returns: the generic adapter's catalog is read from it.

The probe runs the model on (up to) three rows of the inputs, under ``no_grad``, with a hook of its own
on every module (removed afterwards, also when the forward raises). It records, per module: how often
it ran, its first positional input and the tensor fields of its output (shapes after the batch axis),
and whether the forward changed one of those tensors in place after the module handed it over (an
in-place ReLU after a convolution), so the reaches know to hand out a copy. The random number
generator and, for a model in training mode, the buffers (batch-norm statistics) are restored.

A :class:`Probe` is plain data: no module or tensor of the model is kept.
"""

from __future__ import annotations

import itertools
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn

from crosspatch.engine.adapter import Inputs, batch_size

from .axes import AxisHints
from .fields import FieldKey, fields, subscriptable

__all__ = ["PROBE_ROWS", "Seen", "OutputField", "ModuleRecord", "Probe", "input_signature", "probe_inputs", "run_probe"]

#: Rows the probe runs. Three, not one: a tensor is taken as batched when its first axis has the probe's
#: row count, and a module's batch-free output (a position embedding of shape [1, pos, dim]) must not pass.
PROBE_ROWS = 3


@dataclass(frozen=True)
class Seen:
    """One tensor the probe saw: its shape after the batch axis, and whether the forward later changed it in place."""

    shape: tuple[int, ...]
    changed: bool = False


@dataclass(frozen=True)
class OutputField:
    """A batched floating-point tensor in a module's output, at ``key`` (``None``: the output is the tensor)."""

    key: FieldKey
    attribute: bool  # a plain dataclass's field, read as an attribute rather than ``output[key]``
    seen: Seen


@dataclass(frozen=True)
class ModuleRecord:
    """What one module did in the probe's forward (its first call, and how many calls there were)."""

    calls: int
    input: Seen | None  # its first positional argument, when that is a batched floating-point tensor
    outputs: tuple[OutputField, ...]
    entered: int  # when its first call started, counted over every hook event of the forward
    left: int  # when its first call returned


@dataclass(frozen=True)
class Probe:
    """Every module of a model by its (first) path: the ones that ran, the tree, and the extra paths of shared ones."""

    records: dict[str, ModuleRecord]  # the modules that ran
    children: dict[str, tuple[str, ...]]  # every module's child names
    aliases: dict[str, str] = field(default_factory=dict)  # a second path of a module -> its first path
    hints: AxisHints = AxisHints()


@dataclass
class _Calls:
    calls: int = 0
    entered: int = -1
    left: int = -1
    input: torch.Tensor | None = None
    outputs: list[tuple[FieldKey, bool, torch.Tensor]] = field(default_factory=list)


def _batched(value: Any, rows: int) -> bool:
    return isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == rows and value.is_floating_point()


def probe_inputs(inputs: Inputs, rows: int = PROBE_ROWS) -> Inputs:
    """``rows`` rows of the inputs: the first ones, repeated when there are fewer."""
    n = batch_size(inputs)
    index = torch.arange(rows) % n
    return {
        k: v[index.to(v.device)] if isinstance(v, torch.Tensor) and v.ndim > 0 and v.shape[0] == n else v
        for k, v in inputs.items()
    }


def run_probe(model: nn.Module, inputs: Inputs, forward: Callable[[nn.Module, Inputs], Any]) -> Probe:
    """Run ``forward(model, ...)`` once on a few rows of ``inputs`` and record every module (see the module doc)."""
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    children: dict[str, tuple[str, ...]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        if id(module) in first:
            aliases[path] = first[id(module)]
            continue
        first[id(module)] = path
        children[path] = tuple(name for name, _ in module.named_children())

    calls: dict[int, _Calls] = {}
    clock = itertools.count()
    watched: dict[int, tuple[torch.Tensor, int]] = {}  # every tensor handed over, with its version then

    def watch(tensor: torch.Tensor) -> torch.Tensor:
        watched.setdefault(id(tensor), (tensor, _version(tensor)))
        return tensor

    def before(module, args, kwargs):
        seen = calls.setdefault(id(module), _Calls())
        seen.calls += 1
        if seen.calls == 1:
            seen.entered = next(clock)
            if args and _batched(args[0], PROBE_ROWS):
                seen.input = watch(args[0])

    def after(module, args, output):
        seen = calls[id(module)]
        if seen.left < 0:
            seen.left = next(clock)
            for key, value in fields(output):
                if _batched(value, PROBE_ROWS):
                    seen.outputs.append((key, not subscriptable(output), watch(value)))

    rows = probe_inputs(inputs)
    handles = []
    try:
        for module in {id(m): m for m in model.modules()}.values():
            handles.append(module.register_forward_pre_hook(before, with_kwargs=True))
            handles.append(module.register_forward_hook(after))
        with _untouched(model), torch.no_grad():
            forward(model, rows)
    except Exception as err:
        if hasattr(err, "add_note"):
            err.add_note("(raised in the forward the generic adapter runs to read a model's sites from its inputs)")
        raise
    finally:
        for handle in handles:
            handle.remove()
    changed = {key for key, (t, version) in watched.items() if _version(t) != version}
    records = {}
    for ident, seen in calls.items():
        if seen.left < 0:
            continue  # raised, or is still running: nothing to serve
        records[first[ident]] = ModuleRecord(
            calls=seen.calls,
            input=None if seen.input is None else _seen(seen.input, changed),
            outputs=tuple(OutputField(key, attr, _seen(t, changed)) for key, attr, t in seen.outputs),
            entered=seen.entered,
            left=seen.left,
        )
    return Probe(records, children, aliases, AxisHints.read(model, inputs))


@contextmanager
def _untouched(model: nn.Module) -> Iterator[None]:
    """Leave the random number generators, and a training model's buffers, as they were."""
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    training = any(m.training for m in model.modules())
    saved = {name: b.detach().clone() for name, b in model.named_buffers()} if training else {}
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            with torch.no_grad():
                for name, buffer in model.named_buffers():
                    if name in saved:
                        buffer.copy_(saved[name])


def input_signature(model: nn.Module, inputs: Mapping[str, Any]) -> tuple:
    """What decides a probe's result: the module tree and mode, and each input's sizes beyond the batch axis."""
    tree = tuple(id(m) for m in model.modules())
    return tree, model.training, tuple((key, _describe(value)) for key, value in inputs.items())


def _describe(value: Any) -> tuple:
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape[1:]), value.ndim, value.dtype, value.device.type)
    if value is None or isinstance(value, (bool, int, float, str)):
        return ("value", value)
    return ("object", type(value).__qualname__)


def _version(tensor: torch.Tensor) -> int:
    if tensor.is_inference():  # inference tensors keep no version (and cannot be changed outside inference mode)
        return -1
    return tensor._version


def _seen(tensor: torch.Tensor, changed: set[int]) -> Seen:
    return Seen(tuple(tensor.shape[1:]), id(tensor) in changed)
