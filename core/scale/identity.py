"""A canonical description of what decides a study's numbers: the key its saved shards are found by.

Pickled bytes are no key: a tensor's or a by-value function's pickle changes on every round trip, so
a study planned on a Ray actor never found the shards a failed run had saved. :func:`describe` turns a
value into plain JSON data that is equal for equal values in any process:

* tensors and arrays by dtype, shape and a hash of their contents;
* objects with a ``to_dict`` (interventions, trainable interventions) by it;
* functions by their code, defaults, closure and the globals they read; a function or class of an
  installed library (or of crosspatch) by its name, one of the user's (a script, a notebook, a test
  module) by its code;
* modules (``nn.Module``) by their type, plain attributes and ``state_dict``; other objects by their
  type and attributes.

What it cannot see into (a lock, a C object with hidden state) raises :class:`Opaque`, naming where
it sits (``metric.fn.<closure cache>``), so the caller can refuse to promise a resume instead of
keying a study by something that does not identify it.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
import json
import logging
import sys
import sysconfig
import types
from pathlib import Path, PurePath
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["Opaque", "describe", "fingerprint", "tensor_bytes"]

_MAX_DEPTH = 40
_PLAIN_BASES = (object, dict, list, tuple, set, frozenset, int, float, str, bytes, BaseException)


class Opaque(TypeError):
    """A value :func:`describe` cannot see into; ``where`` names it (``metric.fn.<closure x>``)."""

    def __init__(self, what: str, where: str):
        super().__init__(f"{where} is {what}")
        self.what, self.where = what, where


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """dtype, shape and raw bytes of a tensor: what a content hash needs."""
    flat = tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
    return f"{tensor.dtype}{tuple(tensor.shape)}".encode() + flat


def fingerprint(value: Any, where: str = "value") -> str:
    """sha256 of :func:`describe` ``(value)`` as canonical JSON."""
    text = json.dumps(describe(value, where), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def describe(value: Any, where: str = "value") -> Any:
    """``value`` as JSON data that is equal exactly when the values are (see the module docstring);
    raises :class:`Opaque` for what it cannot see into, naming it from ``where``."""
    return _Describer().run(value, where, 0)


@functools.lru_cache(maxsize=None)
def _library_roots() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    roots = {paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths}
    return tuple(str(Path(p).resolve()) for p in roots)


def _is_library(module_name: str | None) -> bool:
    """Whether a module is an installed library (named, not hashed): crosspatch, the standard library,
    site-packages, built-in modules. A script, a notebook or a test module is the user's own code."""
    if not module_name or module_name == "__main__":
        return False
    if module_name.split(".")[0] == "crosspatch":  # installed editable, outside site-packages
        return True
    module = sys.modules.get(module_name)
    if module is None:
        return False
    file = getattr(module, "__file__", None)
    if file is None:
        return module_name in sys.builtin_module_names
    resolved = str(Path(file).resolve())
    return any(resolved.startswith(root) for root in _library_roots())


def _named(obj: Any) -> bool:
    """A function or class a library defines at module level: its name says what it does."""
    qualname = getattr(obj, "__qualname__", "")
    return "<" not in qualname and _is_library(getattr(obj, "__module__", None))


def _ref(obj: Any) -> str:
    return f"{getattr(obj, '__module__', None)}:{getattr(obj, '__qualname__', getattr(obj, '__name__', '?'))}"


def _hidden_state(cls: type) -> bool:
    """A class with a base written in C, which may keep state outside ``__dict__`` (``random.Random``)."""
    for base in cls.__mro__:
        if base in _PLAIN_BASES:
            continue
        module = sys.modules.get(base.__module__)
        file = getattr(module, "__file__", None) if module is not None else None
        if module is not None and (file is None or not file.endswith(".py")) and base.__module__ != "__main__":
            return True
    return False


def _code_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _code_names(const)
    return names


class _Describer:
    def __init__(self) -> None:
        self.path: list[int] = []  # ids of the containers being described: a cycle is named, not followed

    def run(self, obj: Any, where: str, depth: int) -> Any:
        if depth > _MAX_DEPTH:
            raise Opaque(f"nested more than {_MAX_DEPTH} levels deep", where)
        if obj is None or isinstance(obj, (bool, str)):
            return obj
        if type(obj) is int:
            return obj
        if type(obj) is float:
            return {"float": obj.hex()}
        if isinstance(obj, enum.Enum):
            return {"enum": _ref(type(obj)), "name": obj.name}
        if isinstance(obj, (torch.dtype, torch.device, torch.layout, torch.memory_format)):
            return {"torch": str(obj)}
        if isinstance(obj, torch.Tensor):
            return self.tensor(obj, where)
        if isinstance(obj, np.ndarray):
            if obj.dtype == object:
                return {"ndarray": "object", "shape": list(obj.shape), "items": self.run(obj.tolist(), where, depth + 1)}
            data = np.ascontiguousarray(obj)
            return {"ndarray": data.dtype.str, "shape": list(data.shape), "sha256": hashlib.sha256(data.tobytes()).hexdigest()}
        if isinstance(obj, np.generic):
            return {"numpy": obj.dtype.str, "value": self.run(obj.item(), where, depth + 1)}
        if isinstance(obj, (bytes, bytearray)):
            return {"bytes": hashlib.sha256(bytes(obj)).hexdigest()}
        if type(obj) is complex:
            return {"complex": [obj.real.hex(), obj.imag.hex()]}
        if isinstance(obj, (int, float)):  # a subclass (IntFlag values, numpy-like scalars)
            return {"type": _ref(type(obj)), "value": self.run(int(obj) if isinstance(obj, int) else float(obj), where, depth + 1)}
        if isinstance(obj, PurePath):
            return {"path": str(obj)}
        if isinstance(obj, (slice, range)):
            return {type(obj).__name__: [self.run(x, where, depth + 1) for x in (obj.start, obj.stop, obj.step)]}
        if isinstance(obj, types.ModuleType):
            return {"module": obj.__name__}
        if isinstance(obj, logging.Logger):
            return {"logger": obj.name}
        if isinstance(obj, types.CodeType):
            return self.code(obj, where, depth)
        if id(obj) in self.path:
            return {"cycle": _ref(type(obj))}
        self.path.append(id(obj))
        try:
            return self.composite(obj, where, depth)
        finally:
            self.path.pop()

    def tensor(self, t: torch.Tensor, where: str) -> dict:
        try:
            data = tensor_bytes(t)
        except Exception as exc:  # sparse, quantized, meta: no plain bytes to hash
            raise Opaque(f"a {t.layout} {t.dtype} tensor on {t.device} whose contents cannot be read ({exc})", where) from None
        return {"tensor": str(t.dtype), "shape": list(t.shape), "sha256": hashlib.sha256(data).hexdigest()}

    def code(self, code: types.CodeType, where: str, depth: int) -> dict:
        return {
            "code": hashlib.sha256(code.co_code).hexdigest(),
            "consts": [self.run(c, f"{where}.<const>", depth + 1) for c in code.co_consts],
            "names": list(code.co_names),
            "args": [code.co_argcount, code.co_posonlyargcount, code.co_kwonlyargcount],
            "varnames": list(code.co_varnames),
            "freevars": list(code.co_freevars),
        }

    def composite(self, obj: Any, where: str, depth: int) -> Any:
        run = lambda value, at: self.run(value, at, depth + 1)  # noqa: E731
        kind = type(obj)
        if kind in (list, tuple):
            return {kind.__name__: [run(v, f"{where}[{i}]") for i, v in enumerate(obj)]}
        if kind is dict:
            return {"dict": self.mapping(obj, where, depth)}
        if kind in (set, frozenset):
            return {"set": sorted(json.dumps(run(v, f"{where}.<item>"), sort_keys=True) for v in obj)}
        if isinstance(obj, type):
            return self.cls(obj, where, depth)
        if isinstance(obj, types.FunctionType):
            return {"ref": _ref(obj)} if _named(obj) else self.function(obj, where, depth)
        if isinstance(obj, types.MethodType):
            return {"method": run(obj.__func__, f"{where}.__func__"), "self": run(obj.__self__, f"{where}.__self__")}
        if isinstance(obj, (types.BuiltinFunctionType, types.MethodWrapperType, types.WrapperDescriptorType,
                            types.MethodDescriptorType, types.ClassMethodDescriptorType)):
            owner = getattr(obj, "__self__", None)
            bound = owner is not None and not isinstance(owner, (type, types.ModuleType))
            return {"builtin": _ref(obj), **({"self": run(owner, f"{where}.__self__")} if bound else {})}
        if isinstance(obj, functools.partial):
            return {"partial": run(obj.func, f"{where}.func"), "args": run(obj.args, f"{where}.args"),
                    "keywords": run(obj.keywords, f"{where}.keywords")}
        if isinstance(obj, (staticmethod, classmethod)):
            return {kind.__name__: run(obj.__func__, f"{where}.__func__")}
        if isinstance(obj, property):
            return {"property": [run(f, f"{where}.{n}") for n, f in (("fget", obj.fget), ("fset", obj.fset), ("fdel", obj.fdel))]}
        to_dict = getattr(obj, "to_dict", None)
        if callable(to_dict):
            try:
                data = to_dict()
            except Exception:  # e.g. an intervention wrapping a function: described by its attributes below
                data = None
            if data is not None:
                return {"type": self.cls(kind, where, depth), "to_dict": run(data, f"{where}.to_dict()")}
        if isinstance(obj, nn.Module):
            plain = {k: v for k, v in vars(obj).items() if not k.startswith("_")}
            return {"type": self.cls(kind, where, depth), "attributes": self.mapping(plain, where, depth),
                    "state": self.mapping(dict(obj.state_dict()), where, depth)}
        if isinstance(obj, (list, tuple, dict)):  # a namedtuple, an OrderedDict, a list subclass
            items = self.mapping(obj, where, depth) if isinstance(obj, dict) else [run(v, f"{where}[{i}]") for i, v in enumerate(obj)]
            return {"type": self.cls(kind, where, depth), "items": items}
        if dataclasses.is_dataclass(obj):
            fields = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
            return {"type": self.cls(kind, where, depth), "fields": self.mapping(fields, where, depth)}
        state = self.attributes(obj)
        if state is None or _hidden_state(kind):
            raise Opaque(f"a {kind.__module__}.{kind.__qualname__} object, whose state crosspatch cannot read "
                         f"(no to_dict, {'C-level state' if state is not None else 'no attributes'})", where)
        return {"type": self.cls(kind, where, depth), "state": self.mapping(state, where, depth)}

    @staticmethod
    def attributes(obj: Any) -> dict[str, Any] | None:
        state: dict[str, Any] | None = dict(vars(obj)) if hasattr(obj, "__dict__") else None
        slots = [s for c in type(obj).__mro__ for s in getattr(c, "__slots__", ()) if s not in ("__dict__", "__weakref__")]
        for name in slots:
            state = state if state is not None else {}
            if hasattr(obj, name):
                state[name] = getattr(obj, name)
        return state

    def mapping(self, data: dict, where: str, depth: int) -> list:
        items = [
            (json.dumps(self.run(k, f"{where}.<key>", depth + 1), sort_keys=True), self.run(v, f"{where}.{k}", depth + 1))
            for k, v in data.items()
        ]
        return sorted(items, key=lambda kv: kv[0])

    def cls(self, cls: type, where: str, depth: int) -> Any:
        """A class: by name when a library defines it, else by name and body (the user may edit it)."""
        if _named(cls):
            return {"class": _ref(cls)}
        skip = {"__dict__", "__weakref__", "__module__", "__doc__", "__qualname__", "__annotations__",
                "__dataclass_fields__", "__dataclass_params__", "__match_args__", "__parameters__", "__orig_bases__"}
        body = {k: v for k, v in vars(cls).items() if k not in skip}
        return {"class": _ref(cls), "bases": [self.run(b, f"{where}.<base>", depth + 1) for b in cls.__bases__],
                "body": self.mapping(body, f"{where}.<class {cls.__qualname__}>", depth)}

    def function(self, fn: types.FunctionType, where: str, depth: int) -> dict:
        """Code, defaults, closure and the globals the code reads (functions and classes of libraries by name)."""
        run = lambda value, at: self.run(value, at, depth + 1)  # noqa: E731
        closure = {}
        for name, cell in zip(fn.__code__.co_freevars, fn.__closure__ or ()):
            try:
                closure[name] = run(cell.cell_contents, f"{where}.<closure {name}>")
            except ValueError:  # an empty cell (a name assigned after the function was made)
                closure[name] = {"empty": True}
        read = {}
        for name in sorted(_code_names(fn.__code__)):
            if name not in fn.__globals__:
                continue
            value = fn.__globals__[name]
            at = f"{where}.<global {name}>"
            if isinstance(value, (type, types.FunctionType)) and _named(value):
                read[name] = {"ref": _ref(value)}
            else:
                read[name] = run(value, at)
        return {
            "function": _ref(fn),
            "code": self.code(fn.__code__, where, depth),
            "defaults": run(fn.__defaults__, f"{where}.__defaults__"),
            "kwdefaults": run(fn.__kwdefaults__, f"{where}.__kwdefaults__"),
            "closure": closure,
            "globals": read,
        }
