"""Where a worker gets its model: a zoo name, a local checkpoint folder, a zero-argument factory or
the model itself. A worker loads it once and keeps it for every shard it runs.

Only the zoo name, the folder and a module-level factory travel cheaply (a name, a path, a
reference); a model object is pickled whole into every worker, so keep that for small models.
"""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path
from typing import Any, Callable

from torch import nn

from ..engine.model import WrappedModel, wrap
from ..zoo.sources import wrap as wrap_named
from .identity import fingerprint, tensor_bytes

__all__ = ["ModelSource"]


class ModelSource:
    """How to build the wrapped model on a worker; ``identity()`` names it for resume keys."""

    def __init__(self, spec: "str | Path | Callable[[], Any] | nn.Module | WrappedModel"):
        if isinstance(spec, ModelSource):
            spec = spec.spec
        if not isinstance(spec, (str, Path, nn.Module, WrappedModel)) and not callable(spec):
            raise TypeError(
                f"a sharded run needs the model as a zoo name, a local checkpoint folder, a zero-argument "
                f"factory or an nn.Module / WrappedModel; got {type(spec).__name__}"
            )
        self.spec = str(spec) if isinstance(spec, Path) else spec
        self._identity: str | None = None

    def load(self, device: Any = None) -> WrappedModel:
        spec = self.spec
        if isinstance(spec, str):
            wrapped = wrap_named(spec)  # with its tokenizer, as cp.wrap(name) gives: text prompts work on workers
        else:
            wrapped = wrap(spec if isinstance(spec, (nn.Module, WrappedModel)) else spec())
        if device is not None:
            wrapped.module.to(device)
        return wrapped

    def identity(self) -> str:
        """A string that changes when the model would: zoo name, folder and its files' times, weights hash,
        or a factory's canonical description (:mod:`crosspatch.scale.identity`: its code, defaults,
        closure and the globals it reads). Computed once per source (a run makes a new source); raises
        :class:`~crosspatch.scale.identity.Opaque` for a factory it cannot describe."""
        if self._identity is None:
            self._identity = self._compute_identity()
        return self._identity

    def older_identities(self) -> tuple[str, ...]:
        """How the previous study-key format named this model, where it differs: a factory by its pickle
        (or its name), to recognise the folders runs under that format left."""
        spec = self.spec
        if isinstance(spec, (str, nn.Module, WrappedModel)):
            return ()
        try:
            ref = pickle.dumps(spec)
        except Exception:  # a closure or lambda: that format named it by module and qualname
            ref = f"{getattr(spec, '__module__', '')}.{getattr(spec, '__qualname__', type(spec).__qualname__)}".encode()
        return (f"factory:{hashlib.sha256(ref).hexdigest()}",)

    def _compute_identity(self) -> str:
        spec = self.spec
        if isinstance(spec, str):
            path = Path(spec).expanduser()
            if path.is_dir():
                stamp = max((p.stat().st_mtime_ns for p in path.rglob("*") if p.is_file()), default=0)
                return f"folder:{path.resolve()}@{stamp}"
            return f"zoo:{spec}"
        if isinstance(spec, (nn.Module, WrappedModel)):
            module = spec.module if isinstance(spec, WrappedModel) else spec
            digest = hashlib.sha256(type(module).__qualname__.encode())
            for name, tensor in module.state_dict().items():
                digest.update(name.encode())
                digest.update(tensor_bytes(tensor))
            return f"weights:{digest.hexdigest()}"
        name = getattr(spec, "__qualname__", type(spec).__qualname__)
        return f"factory:{name}:{fingerprint(spec, 'the model factory')[:32]}"

    def __repr__(self) -> str:
        spec = self.spec
        shown = spec if isinstance(spec, str) else getattr(spec, "__qualname__", type(spec).__name__)
        return f"ModelSource({shown!r})"
