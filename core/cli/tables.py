"""Plain-text tables for the commands that list things (``crosspatch plugins``, ``crosspatch zoo
list``): columns padded to their widest cell, two spaces apart, the last column left ragged."""

from __future__ import annotations

from typing import Sequence

__all__ = ["format_rows"]


def format_rows(rows: Sequence[Sequence[str]]) -> list[str]:
    """One line per row, the header included; every column but the last padded to its widest cell."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    out = []
    for row in rows:
        cells = [cell.ljust(w) for cell, w in zip(row, widths)] + [row[-1]]
        out.append("  ".join(cells).rstrip())
    return out
