"""A decompiled program: its operations (one per kept head or MLP output variable) and its Python source.

:meth:`Program.source` writes a standalone file (the interpreter of :mod:`.primitives` plus one
``program(tokens)`` function); :meth:`Program.compiled` executes that very text, so verification
runs the emitted code, not a model of it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Union

from .primitives import INTERPRETER

__all__ = ["Lookup", "Offset", "Operation", "Program", "SelectAggregate", "identifier"]


@dataclass
class SelectAggregate:
    """``out = aggregate(select(keys, queries, predicate), values)`` read from one attention head.

    ``value_of`` set: the values are ``indicator(value, value_of)``.
    ``pattern_fit`` is the fraction of query rows whose attended set the selector reproduces;
    ``agreement`` the fraction of positions whose written value the aggregate reproduces.
    """

    node: str
    out: str
    keys: str
    queries: str
    predicate: str
    bos: str
    value: str
    numerical: bool
    causal: bool = False
    value_of: Any = None
    pattern_fit: float = 1.0
    agreement: float = 1.0

    @property
    def reads(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((self.keys, self.queries, self.value)))

    def describe(self) -> str:
        v = f"{self.value}=={self.value_of!r}" if self.value_of is not None else self.value
        kind = "numerical" if self.numerical else "categorical"
        return f"Select({self.keys}, {self.queries}, {self.predicate}) + {kind} Aggregate({v})"


@dataclass
class Lookup:
    """``out = table[inputs]`` position-wise: an MLP (or the readout) as a table over the values it sees."""

    node: str
    out: str
    inputs: tuple[str, ...]
    table: dict
    numerical: bool
    agreement: float = 1.0

    @property
    def reads(self) -> tuple[str, ...]:
        return self.inputs

    def describe(self) -> str:
        return f"Map({', '.join(self.inputs)}) -> {self.out} ({len(self.table)} entries)"


@dataclass
class Offset:
    """``out = source + offset`` position-wise (a numerical Map, e.g. the previous position's index)."""

    node: str
    out: str
    source: str
    offset: int
    agreement: float = 1.0

    @property
    def reads(self) -> tuple[str, ...]:
        return (self.source,)

    def describe(self) -> str:
        return f"Map({self.source}, x {'+' if self.offset >= 0 else '-'} {abs(self.offset)})"


Operation = Union[SelectAggregate, Lookup, Offset]


def identifier(name: str) -> str:
    """A Python identifier for a variable name (``opp_idx-1_3`` -> ``opp_idx_1_3``)."""
    ident = re.sub(r"\W", "_", str(name))
    return ident if ident and not ident[0].isdigit() else f"v_{ident}"


@dataclass
class Program:
    """Inputs ``tokens`` (start token first) and ``indices`` (``None`` at the start, then
    ``index_start, index_start + 1, ...``), operations in order, the output variable."""

    name: str
    operations: list[Operation]
    output: str
    numerical_output: bool
    index_start: int = 0
    causal: bool = False
    notes: list[str] = field(default_factory=list)

    def source(self) -> str:
        lines = [
            f'"""{self.name}: decompiled by crosspatch.methods.decompile (runs on its own; no crosspatch import).',
            "",
            "program(tokens) takes the input tokens (no start token) and returns one output per token.",
            '"""',
            "",
            INTERPRETER,
            "",
            "def program(tokens):",
            "    tokens = [BOS] + list(tokens)",
            "    indices = [None] + " + (f"list(range({self.index_start}, {self.index_start} + len(tokens) - 1))"
                                      if self.index_start else "list(range(len(tokens) - 1))"),
        ]
        for op in self.operations:
            lines.append(f"    # {op.node}: {op.describe()}")
            lines.append(f"    {identifier(op.out)} = {_expression(op)}")
        lines.append(f"    return {identifier(self.output)}[1:]")
        return "\n".join(lines) + "\n"

    def compiled(self) -> Callable[[list], list]:
        """The emitted ``program`` function, from executing :meth:`source`."""
        namespace: dict[str, Any] = {"__name__": "decompiled"}
        exec(compile(self.source(), f"<decompiled {self.name}>", "exec"), namespace)
        return namespace["program"]

    def reads(self) -> dict[str, tuple[str, ...]]:
        return {op.out: op.reads for op in self.operations}


def _expression(op: Operation) -> str:
    if isinstance(op, Offset):
        sign = "+" if op.offset >= 0 else "-"
        return f"[None if v is None else v {sign} {abs(op.offset)} for v in {identifier(op.source)}]"
    if isinstance(op, Lookup):
        args = ", ".join(identifier(v) for v in op.inputs)
        return f"lookup({_literal(op.table)}, {args})"
    sel = f'select({identifier(op.keys)}, {identifier(op.queries)}, "{op.predicate}", bos="{op.bos}"' + (
        ", causal=True)" if op.causal else ")")
    if op.numerical:
        values = identifier(op.value) if op.value_of is None else f"indicator({identifier(op.value)}, {op.value_of!r})"
        return f"numerical_aggregate({sel}, {values})"
    return f"categorical_aggregate({sel}, {identifier(op.value)})"


def _literal(table: dict) -> str:
    items = sorted(table.items(), key=lambda kv: repr(kv[0]))
    return "{" + ", ".join(f"{k!r}: {v!r}" for k, v in items) + "}"
