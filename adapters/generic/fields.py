"""The fields of a module's output: a tensor, a tuple or list, a dict or ``ModelOutput``, a dataclass.

A field is addressed by a key: ``None`` for an output that is a tensor itself, an ``int`` for an
element of a tuple or list, a ``str`` for a mapping's key or a dataclass's field. Only the top level
is read: a tuple nested in a field is one (non-tensor) field.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Mapping, Union

import torch

__all__ = ["FieldKey", "fields", "get_field", "replace_field", "subscriptable", "primary_tensor"]

FieldKey = Union[int, str, None]


def fields(output: Any) -> Iterator[tuple[FieldKey, Any]]:
    """Every top-level field of ``output`` as ``(key, value)``, in order."""
    if isinstance(output, torch.Tensor):
        yield None, output
    elif isinstance(output, Mapping):  # dicts, and transformers' ModelOutput (its keys skip None fields)
        yield from output.items()
    elif isinstance(output, (tuple, list)):
        yield from enumerate(output)
    elif dataclasses.is_dataclass(output) and not isinstance(output, type):
        for f in dataclasses.fields(output):
            yield f.name, getattr(output, f.name)


def subscriptable(output: Any) -> bool:
    """Whether a field of ``output`` is read as ``output[key]`` (a plain dataclass's is an attribute)."""
    return isinstance(output, (torch.Tensor, Mapping, tuple, list))


def get_field(output: Any, key: FieldKey) -> Any:
    if key is None:
        return output
    if isinstance(output, (Mapping, tuple, list)):
        return output[key]
    return getattr(output, key)


def replace_field(output: Any, key: FieldKey, value: torch.Tensor) -> Any:
    """A copy of ``output`` with field ``key`` replaced (the module's own object is left as it is)."""
    if key is None:
        return value
    if dataclasses.is_dataclass(output):  # ModelOutput too: it is a dataclass and a mapping
        return dataclasses.replace(output, **{key: value})
    if isinstance(output, Mapping):
        return type(output)({**output, key: value})
    items = list(output)
    items[key] = value
    if isinstance(output, list):
        return items
    if hasattr(output, "_fields"):  # a namedtuple
        return type(output)(*items)
    return type(output)(items)


def primary_tensor(output: Any) -> torch.Tensor | None:
    """The first tensor field with a batch axis (a floating one when there is one): a model's main output."""
    tensors = [v for _, v in fields(output) if isinstance(v, torch.Tensor) and v.ndim > 0]
    floating = [t for t in tensors if t.is_floating_point()]
    return (floating or tensors or [None])[0]
