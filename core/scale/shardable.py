"""``executor=`` for a method, added from the outside.

A local run calls the method itself. Any other executor cuts the study into shards
(:mod:`crosspatch.scale.sharding`), runs them on workers (:mod:`crosspatch.scale.executors`) and
merges them into the Result the local run gives. ``cp.activation_patching`` and
``cp.attribution_patching`` are the wrapped methods; ``crosspatch.methods`` holds the plain ones.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

from ..methods.activation_patching import activation_patching as _activation_patching
from ..methods.attribution import attribution_patching as _attribution_patching
from ..results.result import Result
from .dispatch import dispatch
from .sharding import SHARDABLE

__all__ = ["shardable", "activation_patching", "attribution_patching"]

_EXECUTOR_DOC = """
    ``executor`` ("local", "ray" or an :class:`~crosspatch.scale.executors.Executor`) runs the study as
    shards on workers and merges them (:mod:`crosspatch.scale`); "local" is the plain in-process run.
"""


def shardable(method: Callable[..., Result]) -> Callable[..., Result]:
    """``method`` with a keyword ``executor``; the method must be one :data:`SHARDABLE` knows how to split."""
    name = method.__name__
    if SHARDABLE.get(name) is not method:
        raise ValueError(f"{name!r} cannot be sharded; methods that can: {', '.join(SHARDABLE)}")
    signature = inspect.signature(method)

    @functools.wraps(method)
    def run(*args: Any, executor: Any = "local", **kwargs: Any) -> Result:
        if isinstance(executor, str) and executor == "local":
            return method(*args, **kwargs)
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return dispatch(executor, name, dict(bound.arguments))

    executor = inspect.Parameter("executor", inspect.Parameter.KEYWORD_ONLY, default="local")
    run.__signature__ = signature.replace(parameters=[*signature.parameters.values(), executor])  # type: ignore[attr-defined]
    run.__doc__ = (method.__doc__ or "").rstrip() + "\n" + _EXECUTOR_DOC
    return run


activation_patching = shardable(_activation_patching)
attribution_patching = shardable(_attribution_patching)
