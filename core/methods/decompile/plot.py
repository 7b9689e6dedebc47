"""The pruned graph as a PNG: inputs, kept components (with their primitive) and the variables between them."""

from __future__ import annotations

from pathlib import Path

from .ablation import PrunedGraph
from .program import Program

__all__ = ["plot_graph"]


def plot_graph(program: Program, graph: PrunedGraph, path: "str | Path", title: str = "") -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: nothing global, and its import is slow

    ops = program.operations
    columns: dict[str, int] = {"tokens": 0, "indices": 0}
    rows: dict[str, float] = {"tokens": 0.0, "indices": 1.0}
    writer: dict[str, str] = {}
    col_count: dict[int, int] = {0: 2}
    for op in ops:
        col = 1 + max(columns.get(v, 0) for v in op.reads)
        columns[op.out] = col
        rows[op.out] = float(col_count.get(col, 0))
        col_count[col] = col_count.get(col, 0) + 1
        writer[op.out] = op.node
    n_cols = max(columns.values()) + 1
    n_rows = max(col_count.values())
    fig = Figure(figsize=(2.6 * n_cols + 0.8, 1.9 * n_rows + 2.2))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    pos = {v: (columns[v] * 3.4, -rows[v] * 2.2) for v in columns}
    boxes = {}
    for v, (x, y) in pos.items():
        if v in writer:
            op = next(o for o in ops if o.out == v)
            colour = _COLOURS[_kind(op.node)]
            text = f"{op.node}\n{v}\n{_wrap(op.describe())}\nagreement {op.agreement:.3f}"
        else:
            colour, text = "#e3e3e3", f"{v}\n(input)"
        boxes[v] = ax.text(x, y, text, ha="center", va="center", fontsize=7.5, zorder=2,
                           bbox={"boxstyle": "round,pad=0.4", "fc": colour, "ec": "#333333"})
    for op in ops:
        for v in op.reads:
            if v not in pos:
                continue
            far = columns[op.out] - columns[v] > 1 and abs(pos[op.out][1] - pos[v][1]) < 1e-6
            ax.annotate("", xy=pos[op.out], xytext=pos[v], zorder=3,
                        arrowprops={"arrowstyle": "-|>", "color": "#444444", "lw": 1.0, "mutation_scale": 12,
                                    "patchA": boxes[v].get_bbox_patch(), "patchB": boxes[op.out].get_bbox_patch(),
                                    "connectionstyle": f"arc3,rad={-0.12 if far else 0.0}"})
    if program.output in pos:
        x, y = pos[program.output]
        ax.text(x, y + 1.05, "output", ha="center", fontsize=8, color="#a00000")
    pruned = len(graph.nodes) - len(graph.kept)
    ax.set_title(f"{title}\nkept {len(graph.kept)} of {len(graph.nodes)} components ({pruned} replaced by their "
                 f"optimal-ablation constant; accuracy {graph.pruned_accuracy:.3f})\nblue: heads, orange: MLPs, "
                 f"purple: MLPs and unembedding read as one table, green: index maps", fontsize=9)
    ax.set_xlim(-1.7, (n_cols - 1) * 3.4 + 1.7)
    ax.set_ylim(-(n_rows - 1) * 2.2 - 1.3, 1.5)
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


_COLOURS = {"head": "#cfe3f7", "mlp": "#f7dfc6", "readout": "#e6d5f2", "map": "#dcefd2"}


def _kind(node: str) -> str:
    if "head=" in node:
        return "head"
    if node.startswith("readout"):
        return "readout"
    return "mlp" if node.startswith("mlp_out") else "map"


def _wrap(text: str, width: int = 30) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width, break_on_hyphens=False))
