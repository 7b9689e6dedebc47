"""Sites: names for addressable activations, and their string grammar.

A site is a *family* (``resid_pre``, ``head_out``, ``latent.z`` ...), an optional layer and
selections along named axes::

    head_out.5[head=2]        one head of layer 5
    resid_pre.*[pos=7]        position 7 of every layer (a sweep over layers)
    head_out.*[head=*]        every head of every layer, one site each
    latent.z[dim=4]           a family without layers
    resid_post.3[pos=2:5]     positions 2, 3 and 4 together, as one site
    head_out.1[head={0,2}]    heads 0 and 2 together, as one site

``*`` marks a sweep: one concrete site per index. An axis that is not named is taken whole.
The string form round-trips: ``str(Site.parse(s)) == s`` for every canonical ``s``.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Union

__all__ = ["ANY", "Span", "Selector", "Site", "SiteError", "site_key", "split_tower"]

ANY = "*"


@dataclass(frozen=True)
class Span:
    """A half-open range ``start:stop`` along one axis, selected together as one site."""

    start: int | None = None
    stop: int | None = None

    def __str__(self) -> str:
        return f"{'' if self.start is None else self.start}:{'' if self.stop is None else self.stop}"


Selector = Union[int, str, Span, tuple[int, ...]]  # int, ANY, Span or a set of indices


class SiteError(ValueError):
    """A site string or site that does not fit the grammar or the model's catalog."""


_DIGITS = frozenset("0123456789")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_INT = re.compile(r"-?[0-9]+")


def _fail(text: str, at: int, what: str) -> SiteError:
    return SiteError(f"invalid site {text!r} at character {at}: {what}\n  {text}\n  {' ' * at}^")


def _format_selector(value: Selector) -> str:
    if isinstance(value, tuple):
        return "{" + ",".join(str(v) for v in value) + "}"
    return str(value)


@dataclass(frozen=True)
class Site:
    """One addressable activation, or a pattern of them when it holds ``*``.

    ``sel`` is a tuple of ``(axis, selector)`` pairs so that sites hash and compare by value;
    use :attr:`selection` for a dict view and :meth:`make` to build one with keywords.
    """

    family: str
    layer: int | str | None = None
    sel: tuple[tuple[str, Selector], ...] = ()

    @classmethod
    def make(cls, family: str, layer: int | str | None = None, **selection: Selector) -> "Site":
        return cls(family, layer, tuple((axis, _selector(axis, value)) for axis, value in selection.items()))

    @property
    def selection(self) -> dict[str, Selector]:
        return dict(self.sel)

    @property
    def key(self) -> str:
        """The family and layer, without selections: what a cache stores."""
        return site_key(self.family, self.layer)

    @property
    def is_pattern(self) -> bool:
        return self.layer == ANY or any(v == ANY for _, v in self.sel)

    def with_(self, layer: int | str | None = None, **selection: Selector) -> "Site":
        """A copy with the layer and/or some axis selections replaced."""
        sel = dict(self.sel)
        sel.update({axis: _selector(axis, value) for axis, value in selection.items()})
        return Site(self.family, self.layer if layer is None else layer, tuple(sel.items()))

    def __str__(self) -> str:
        text = self.key
        if self.sel:
            text += "[" + ",".join(f"{a}={_format_selector(v)}" for a, v in self.sel) + "]"
        return text

    @classmethod
    def parse(cls, text: "str | Site") -> "Site":
        """Parse the string form; errors point at the offending character."""
        if isinstance(text, Site):
            return text
        if not isinstance(text, str):
            raise SiteError(f"a site is a string like 'head_out.3[head=1]' or a Site, got {type(text).__name__}")
        return _parse(text)


@functools.lru_cache(maxsize=4096)
def _parse(text: str) -> Site:
    """Sites are immutable, so one parse serves every run that names the same text."""
    return _Parser(text).site()


def _selector(axis: str, value) -> Selector:
    """Normalise a Python value (int, '*', slice, list, set, tuple, Span) into a selector."""
    if isinstance(value, slice):
        if value.step not in (None, 1):
            raise SiteError(f"axis {axis!r}: steps are not supported in a selection, got {value}")
        return Span(value.start, value.stop)
    if isinstance(value, (list, set, tuple)):
        if not value:
            raise SiteError(f"axis {axis!r}: an empty set of indices selects nothing")
        return tuple(sorted(set(value)))
    return value


def site_key(family: str, layer: int | str | None) -> str:
    return family if layer is None else f"{family}.{layer}"


def split_tower(family: str) -> tuple[str, str]:
    """A family name as its tower prefix and its role: ``"vision.head_in"`` -> ``("vision.", "head_in")``,
    ``"head_in"`` -> ``("", "head_in")``."""
    tower, dot, role = family.rpartition(".")
    return tower + dot, role


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.i = 0

    def site(self) -> Site:
        family, layer = self._head()
        sel: list[tuple[str, Selector]] = []
        if self._peek() == "[":
            self.i += 1
            while True:
                axis = self._ident("an axis name such as pos, head, neuron, dim or channel")
                if any(a == axis for a, _ in sel):
                    raise _fail(self.text, self.i - len(axis), f"axis {axis!r} is selected twice")
                self._expect("=")
                sel.append((axis, self._selector()))
                if self._peek() == ",":
                    self.i += 1
                    continue
                self._expect("]")
                break
        if self.i != len(self.text):
            raise _fail(self.text, self.i, "unexpected text after the site")
        return Site(family, layer, tuple(sel))

    def _peek(self) -> str:
        return self.text[self.i] if self.i < len(self.text) else ""

    def _expect(self, char: str) -> None:
        if self._peek() != char:
            found = repr(self._peek()) if self._peek() else "the end"
            raise _fail(self.text, self.i, f"expected {char!r}, found {found}")
        self.i += 1

    def _ident(self, what: str) -> str:
        m = _IDENT.match(self.text, self.i)
        if not m:
            raise _fail(self.text, self.i, f"expected {what}")
        self.i = m.end()
        return m.group()

    def _int(self) -> int:
        m = _INT.match(self.text, self.i)
        if not m:
            raise _fail(self.text, self.i, "expected an integer")
        self.i = m.end()
        return int(m.group())

    def _head(self) -> tuple[str, int | str | None]:
        parts = [self._ident("a site family such as resid_pre, head_out or latent.z")]
        layer: int | str | None = None
        while self._peek() == ".":
            self.i += 1
            if self._peek() == ANY:
                self.i += 1
                layer = ANY
                break
            if self._peek() in _DIGITS or self._peek() == "-":
                layer = self._int()
                break
            parts.append(self._ident("a family name part, a layer number or '*'"))
        return ".".join(parts), layer

    def _selector(self) -> Selector:
        c = self._peek()
        if c == ANY:
            self.i += 1
            return ANY
        if c == "{":
            self.i += 1
            values = [self._int()]
            while self._peek() == ",":
                self.i += 1
                values.append(self._int())
            self._expect("}")
            return tuple(sorted(set(values)))
        start = self._int() if (c in _DIGITS or c == "-") else None
        if self._peek() == ":":
            self.i += 1
            c = self._peek()
            stop = self._int() if (c in _DIGITS or c == "-") else None
            return Span(start, stop)
        if start is None:
            raise _fail(self.text, self.i, "expected an index, a range a:b, a set {a,b} or '*'")
        return start
