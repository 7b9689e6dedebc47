"""Emission of a standalone Python module: ``program(xs) -> list[int]``, one output per input step.

The state is a tuple of integers updated once per step, either by regressed expressions (all updated
together) or, for a finite machine whose transitions no formula fits, by a lookup table; the output
likewise. The text imports nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["ProgramSpec", "emit"]


@dataclass
class ProgramSpec:
    """What :func:`emit` writes: state variables and their start values, input names (one per input
    dimension), the update (expressions, or a table keyed by ``(state, x)``) and the output
    (expression, or a table keyed by state)."""

    title: str
    state: list[str]
    init: list[int]
    inputs: list[str]
    update: list[str] | None = None
    update_table: dict | None = None
    output: str | None = None
    output_table: dict | None = None
    notes: list[str] = field(default_factory=list)


def _update_lines(spec: ProgramSpec) -> list[str]:
    if spec.update is None:
        return [f"{spec.state[0]} = NEXT[{spec.state[0]}, x]"]
    pairs = [(s, e) for s, e in zip(spec.state, spec.update) if e != s]
    if not pairs:
        return []
    if len(pairs) == 1:
        s, e = pairs[0]
        if e.startswith(f"{s} + ") and " " not in e[len(s) + 3:].strip("()"):
            return [f"{s} += {e[len(s) + 3:]}"]
        if e.startswith(f"{s} - ") and " " not in e[len(s) + 3:].strip("()"):
            return [f"{s} -= {e[len(s) + 3:]}"]
        return [f"{s} = {e}"]
    return [", ".join(s for s, _ in pairs) + " = " + ", ".join(e for _, e in pairs)]


def emit(spec: ProgramSpec) -> str:
    """The module text of ``spec``."""
    lines = [f'"""{spec.title}', ""] + spec.notes + ['"""', ""]
    if spec.update is None:
        lines.append("NEXT = {")
        lines += [f"    {k!r}: {v!r}," for k, v in sorted(spec.update_table.items())]
        lines.append("}")
    if spec.output is None:
        lines.append("OUTPUT = {")
        lines += [f"    {k!r}: {v!r}," for k, v in sorted(spec.output_table.items())]
        lines.append("}")
    if spec.update is None or spec.output is None:
        lines.append("")
    lines += ["", "def program(xs):", '    """One output per step of ``xs``."""']
    lines += [f"    {s} = {v}" for s, v in zip(spec.state, spec.init)]
    lines.append("    out = []")
    if len(spec.inputs) == 1 or spec.update is None:
        lines.append("    for x in xs:")
    else:
        lines.append(f"    for {', '.join(spec.inputs)} in xs:")
    lines += [f"        {line}" for line in _update_lines(spec)]
    output = spec.output if spec.output is not None else f"OUTPUT[{spec.state[0]}]"
    lines.append(f"        out.append({output})")
    lines.append("    return out")
    return "\n".join(lines) + "\n"
