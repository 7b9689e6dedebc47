"""A test tool that raises ``KeyboardInterrupt`` at every traced line of a piece of code, one line per trial.

:class:`Interrupter` runs an action once under ``sys.settrace`` to list the *points* it passes (each line
event, and each return event, of the frames it traces), then reruns it once per point with a
``KeyboardInterrupt`` raised there. Raising from a trace function raises in the traced frame before the
line runs (at a return event: after the frame's last line, before the caller gets the value).

Which frames are traced: those running a *shallow* or *deep* target code object (the engine's
``execute``, a reach's ``install`` ...), and every frame a deep target calls, directly or not, in the
files ``admit`` accepts, down to a *barrier*: a call of a module (``nn.Module.__call__``), inside
which the model computes, is never traced (an interrupt there is an error raised in the forward,
which the engine's other tests cover).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from types import CodeType, FrameType
from typing import Callable, Iterable

import torch
from torch import nn

BARRIERS = {nn.Module._call_impl.__code__, nn.Module._wrapped_call_impl.__code__}
# Lookups that change nothing, whose lines would be most of the points below an install: not traced.
OPAQUE = {nn.Module.__getattr__.__code__, nn.Module.get_submodule.__code__}


@dataclass(frozen=True)
class Point:
    """Where an interrupt was raised: the n-th traced event of a run."""

    index: int
    file: str
    line: int
    function: str
    event: str
    target: str  # the qualified name of the innermost target running

    def __str__(self) -> str:
        return f"#{self.index} {self.event} {os.path.basename(self.file)}:{self.line} in {self.function} (under {self.target})"

    @property
    def where(self) -> tuple:
        """The same code point, wherever in the run (and under whichever target) it comes."""
        return self.file, self.line, self.event


class _Tracer:
    def __init__(self, shallow: set[CodeType], deep: set[CodeType], admit: Callable[[str], bool], fire_at: int | None,
                 opaque: set[CodeType] = frozenset()):
        self.shallow, self.deep, self.admit, self.fire_at = shallow, deep, admit, fire_at
        self.opaque = OPAQUE | opaque
        self.points: list[Point] = []
        self.frames: list[tuple[bool, str]] = []  # traced frames, innermost last: (below traced, target name)
        self.barred = 0  # barrier frames active under a traced frame
        self.fired: Point | None = None

    def __call__(self, frame: FrameType, event: str, arg) -> Callable | None:  # the global trace function
        if self.barred:
            return None
        code = frame.f_code
        below = bool(self.frames) and self.frames[-1][0]
        if (code in BARRIERS or code in self.opaque) and self.frames:
            self.barred += 1
            frame.f_trace_lines = False
            return self._barrier
        if code in self.deep or code in self.shallow:
            self.frames.append((code in self.deep, code.co_qualname))
            return self._local
        if below and self.admit(code.co_filename):
            self.frames.append((True, self.frames[-1][1]))
            return self._local
        return None

    def _barrier(self, frame: FrameType, event: str, arg) -> Callable | None:
        if event == "return":
            self.barred -= 1
        return self._barrier

    def _local(self, frame: FrameType, event: str, arg) -> Callable | None:
        if event in ("line", "return"):
            code = frame.f_code
            point = Point(len(self.points), code.co_filename, frame.f_lineno, code.co_name, event, self.frames[-1][1])
            self.points.append(point)
            if event == "return":
                self.frames.pop()
            if point.index == self.fire_at:
                self.fired = point
                raise KeyboardInterrupt(f"injected at {point}")
        return self._local


def _trace(action: Callable[[], object], tracer: _Tracer) -> None:
    before = sys.gettrace()
    sys.settrace(tracer)
    try:
        action()
    finally:
        sys.settrace(before)


class Interrupter:
    """Interrupts ``action`` at each traced point: the lines of ``shallow`` (functions or code objects),
    and those of ``deep`` and of every frame below them in a file ``admit`` accepts, except ``opaque``
    code (and what it calls)."""

    def __init__(self, shallow: Iterable = (), deep: Iterable = (), admit: Callable[[str], bool] = lambda f: False,
                 opaque: Iterable = ()):
        self.shallow = {getattr(t, "__code__", t) for t in shallow}
        self.deep = {getattr(t, "__code__", t) for t in deep}
        self.admit = admit
        self.opaque = {getattr(t, "__code__", t) for t in opaque}

    def points(self, action: Callable[[], object]) -> list[Point]:
        """Every point of an uninterrupted ``action`` (which must complete)."""
        tracer = _Tracer(self.shallow, self.deep, self.admit, None, self.opaque)
        _trace(action, tracer)
        return tracer.points

    def interrupt(self, action: Callable[[], object], at: int) -> Point:
        """Run ``action`` with a KeyboardInterrupt raised at point ``at``; it must reach the caller."""
        tracer = _Tracer(self.shallow, self.deep, self.admit, at, self.opaque)
        try:
            _trace(action, tracer)
        except KeyboardInterrupt:
            if tracer.fired is None:
                raise
            return tracer.fired
        raise AssertionError(
            f"point {at} was reached ({tracer.fired})" if tracer.fired else f"point {at} was never reached"
            + " and no KeyboardInterrupt came out of the action"
        )


def in_files(*parts: str) -> Callable[[str], bool]:
    """A ``deep`` filter: files whose path contains one of ``parts``."""
    parts = tuple(os.path.normpath(p) for p in parts)
    return lambda filename: any(p in filename for p in parts)


def hook_census(*roots: nn.Module) -> dict:
    """Every hook dict of every module under ``roots`` (by name), and torch's global module hooks."""
    from torch.nn.modules import module as torch_module

    out: dict = {
        "global": {
            name: tuple(getattr(torch_module, name, {}))
            for name in dir(torch_module) if name.startswith("_global_") and name.endswith("hooks")
        }
    }
    for r, root in enumerate(roots):
        for name, sub in root.named_modules(remove_duplicate=False):
            hooks = {attr: tuple(value) for attr, value in vars(sub).items() if "hooks" in attr and isinstance(value, dict)}
            out[f"{r}:{name}"] = (id(sub), hooks)
    return out


def same(a, b) -> bool:
    """Bit-identical tensors (or nested tuples / lists / dicts of them)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)):
        return isinstance(b, (tuple, list)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def first_of_each(points: list[Point]) -> list[Point]:
    """The first point of each code point (a run passes many lines many times, each install through the
    same lines of torch's hook registration)."""
    seen: set = set()
    out = []
    for point in points:
        if point.where not in seen:
            seen.add(point.where)
            out.append(point)
    return out
