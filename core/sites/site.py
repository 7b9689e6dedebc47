"""Sites: names for addressable activations, and their string grammar.

A site is a *family* (``resid_pre``, ``head_out``, ``latent.z`` ...), an optional layer and
selections along named axes::

    head_out.5[head=2]        one head of layer 5
    resid_pre.*[pos=7]        position 7 of every layer (a sweep over layers)
    head_out.*[head=*]        every head of every layer, one site each
    latent.z[dim=4]           a family without layers
    resid_post.3[pos=2:5]     positions 2, 3 and 4 together, as one site
    head_out.1[head={0,2}]    heads 0 and 2 together, as one site
    resid_post.1[pos=last]    each row's last real token (by the attention mask)

``*`` marks a sweep: one concrete site per index. An axis that is not named is taken whole.
The string form round-trips: ``str(Site.parse(s)) == s`` for every canonical ``s``.

Positions are columns of the batch, the same in every row; a negative one counts from the last
column. ``last`` (on ``pos`` and ``key_pos``) is each row's own last real token, what the metrics
read at ``pos=-1``; with right padding the two differ, and a negative position there is refused
(:func:`crosspatch.sites.selection.check_padding`).
"""

from __future__ import annotations

import functools
import operator
import re
from collections.abc import Iterable, Mapping, Set
from dataclasses import dataclass
from typing import Any, Union

__all__ = [
    "ANY", "LAST", "POSITION_AXES", "Span", "Selector", "Site", "SiteError", "site_key", "site_sequence",
    "span_range", "split_tower",
]

ANY = "*"
#: Each row's last real token (the attention mask's last 1), on a position axis.
LAST = "last"
#: Axes that count tokens: where ``last`` applies and where the attention mask says what is padding.
POSITION_AXES = ("pos", "key_pos")


class SiteError(ValueError):
    """A site string or site that does not fit the grammar or the model's catalog."""


def _index(value: Any, what: str) -> int:
    """``value`` as an int (Python, numpy or 0-d integer tensor); bools, floats and strings are refused."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, (bool, str, bytes, float)):
        raise SiteError(f"{what} must be an int, got {value!r} ({type(value).__name__})")
    try:
        return operator.index(value)
    except TypeError:
        raise SiteError(f"{what} must be an int, got {value!r} ({type(value).__name__})") from None


@dataclass(frozen=True)
class Span:
    """A half-open range ``start:stop`` along one axis, selected together as one site."""

    start: int | None = None
    stop: int | None = None

    def __post_init__(self) -> None:
        for name in ("start", "stop"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, _index(value, f"a range's {name}"))

    def __str__(self) -> str:
        return f"{'' if self.start is None else self.start}:{'' if self.stop is None else self.stop}"


Selector = Union[int, str, Span, tuple[int, ...]]  # int, ANY, LAST, Span or a set of indices

_DIGITS = frozenset("0123456789")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_FAMILY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")
_INT = re.compile(r"-?[0-9]+")
_MAX_DIGITS = 18  # any index or layer fits; longer numbers are refused, not converted
_SELECTORS = "an int, a range a:b (a slice or Span), a set of ints {a,b} (a list, set or tuple), '*' or 'last'"


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

    def __post_init__(self) -> None:
        if _plain(self):  # the common case, as sweeps build thousands: nothing to check further
            return
        if not isinstance(self.family, str) or not _FAMILY.fullmatch(self.family):
            raise SiteError(
                f"a site's family is a name such as 'resid_pre', 'head_out' or 'latent.z', got {self.family!r}"
            )
        _NAMES.add(self.family)
        layer = self.layer
        if layer is not None and not (isinstance(layer, str) and layer == ANY):
            if isinstance(layer, str):
                raise SiteError(
                    f"site {self.family}: layer {layer!r} is a string; a layer is an int, '*' or None "
                    f"(parse text with Site.parse('{self.family}.{layer}'))"
                )
            object.__setattr__(self, "layer", _index(layer, f"site {self.family}: the layer"))
        sel = self.sel.items() if isinstance(self.sel, Mapping) else self.sel
        if not isinstance(sel, Iterable) or isinstance(sel, (str, bytes)):
            raise SiteError(f"site {self.family}: sel is a tuple of (axis, selector) pairs, got {self.sel!r}")
        pairs: list[tuple[str, Selector]] = []
        for pair in sel:
            if not (isinstance(pair, tuple) and len(pair) == 2):
                raise SiteError(f"site {self.family}: sel is a tuple of (axis, selector) pairs, got the item {pair!r}")
            axis, value = pair
            if not isinstance(axis, str) or not _IDENT.fullmatch(axis):
                raise SiteError(f"site {self.family}: an axis is a name such as 'pos' or 'head', got {axis!r}")
            if any(a == axis for a, _ in pairs):
                raise SiteError(f"site {self.family}: axis {axis!r} is selected twice")
            pairs.append((axis, _selector(axis, value)))
            _NAMES.add(axis)
        object.__setattr__(self, "sel", tuple(pairs))

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


#: Family and axis names already checked (a bounded set: the names of the models in use).
_NAMES: set[str] = set()


def _plain(site: Site) -> bool:
    """Whether ``site`` is already in normal form with names checked before (no work to do)."""
    layer = site.layer
    if type(site.family) is not str or site.family not in _NAMES or not (type(layer) is int or layer is None or (type(layer) is str and layer == ANY)):
        return False
    if type(site.sel) is not tuple:
        return False
    seen = []
    for pair in site.sel:
        if type(pair) is not tuple or len(pair) != 2 or pair[0] not in _NAMES or pair[0] in seen:
            return False
        value = pair[1]
        if not (type(value) is int or type(value) is Span or (type(value) is str and value in (ANY, LAST))):
            return False
        seen.append(pair[0])
    return True


def _selector(axis: str, value: Any) -> Selector:
    """Normalise a Python value (int, '*', 'last', slice, list, set, tuple, Span) into a selector."""
    if isinstance(value, Span):
        return value
    if isinstance(value, str):
        if value in (ANY, LAST):
            return value
        raise SiteError(f"axis {axis!r}: the selection {value!r} is not one; a selection is {_SELECTORS}")
    if isinstance(value, slice):
        if value.step not in (None, 1):
            raise SiteError(f"axis {axis!r}: steps are not supported in a selection, got {value}")
        return Span(value.start, value.stop)
    if isinstance(value, (list, set, frozenset, tuple)):
        if not value:
            raise SiteError(f"axis {axis!r}: an empty set of indices selects nothing")
        return tuple(sorted({_index(v, f"axis {axis!r}: an index in a set") for v in value}))
    try:
        return _index(value, f"axis {axis!r}: a selection")
    except SiteError:
        raise SiteError(
            f"axis {axis!r}: the selection {value!r} ({type(value).__name__}) is not one; a selection is {_SELECTORS}"
        ) from None


def span_range(site: "Site", axis: str, span: Span, size: int) -> tuple[int, int]:
    """``(start, stop)`` of ``span`` on an axis of ``size``: refused, not clipped, when a bound lies
    outside ``-size..size`` or the range is empty."""
    where = f"axis {axis!r} of size {size}" + (" (the inputs' length)" if axis in POSITION_AXES else "")
    if any(v is not None and not -size <= v <= size for v in (span.start, span.stop)):
        raise SiteError(f"site {site}: the range {span} reaches outside {where}; bounds run from {-size} to {size}")
    start, stop, _ = slice(span.start, span.stop).indices(size)
    if stop <= start:
        raise SiteError(f"site {site}: the range {span} selects nothing on {where}")
    return start, stop


def site_sequence(sites: Any) -> tuple["str | Site", ...]:
    """Sites as given to ``capture`` or a sweep: one site string or :class:`Site`, or an ordered
    iterable of them (a list, a tuple, a generator: read once). Sets are refused (their order is not
    defined, and it is the order of the results), so are mappings and nested lists."""
    accepted = "a site string, a Site, or a list or tuple of them"
    if isinstance(sites, (str, Site)):
        return (sites,)
    if isinstance(sites, (Set, Mapping)) or not isinstance(sites, Iterable) or isinstance(sites, bytes):
        raise SiteError(f"sites are {accepted}; got {type(sites).__name__} {sites!r:.80}")
    out = tuple(sites)
    for i, item in enumerate(out):
        if not isinstance(item, (str, Site)):
            raise SiteError(f"sites are {accepted}; item {i} is a {type(item).__name__}: {item!r:.80}")
    return out


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
        digits = len(m.group().lstrip("-"))
        if digits > _MAX_DIGITS:
            raise _fail(self.text, self.i, f"an integer of {digits} digits; indices and layers have at most {_MAX_DIGITS}")
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
        if _IDENT.match(self.text, self.i):
            at = self.i
            if self._ident("") == LAST:
                return LAST
            raise _fail(self.text, at, "expected an index, a range a:b, a set {a,b}, '*' or 'last'")
        start = self._int() if (c in _DIGITS or c == "-") else None
        if self._peek() == ":":
            self.i += 1
            c = self._peek()
            stop = self._int() if (c in _DIGITS or c == "-") else None
            return Span(start, stop)
        if start is None:
            raise _fail(self.text, self.i, "expected an index, a range a:b, a set {a,b}, '*' or 'last'")
        return start
