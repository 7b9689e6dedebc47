"""The pruned graph as a PNG: inputs, kept components (with their primitive) and the variables between them."""

from __future__ import annotations

from pathlib import Path

from .ablation import PrunedGraph
from .program import Program

__all__ = ["plot_graph"]


def plot_graph(program: Program, graph: PrunedGraph, path: "str | Path", title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

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
    fig, ax = plt.subplots(figsize=(3.4 * n_cols + 1, 1.5 * n_rows + 1.8))
    pos = {v: (columns[v] * 3.4, -rows[v] * 1.5) for v in columns}
    for op in ops:
        x1, y1 = pos[op.out]
        for v in op.reads:
            if v in pos:
                x0, y0 = pos[v]
                ax.annotate("", xy=(x1 - 1.35, y1), xytext=(x0 + 1.35, y0),
                            arrowprops={"arrowstyle": "->", "color": "#555555", "lw": 1.0})
    for v, (x, y) in pos.items():
        if v in writer:
            op = next(o for o in ops if o.out == v)
            colour = "#cfe3f7" if "head=" in op.node else "#f7dfc6"
            text = f"{v}\n{op.node}\n{_short(op.describe())}\nagree {op.agreement:.3f}"
        else:
            colour, text = "#e3e3e3", f"{v}\n(input)"
        ax.text(x, y, text, ha="center", va="center", fontsize=7.5,
                bbox={"boxstyle": "round,pad=0.4", "fc": colour, "ec": "#333333"})
    if program.output in pos:
        x, y = pos[program.output]
        ax.text(x, y + 0.75, "output", ha="center", fontsize=8, color="#a00000")
    pruned = len(graph.nodes) - len(graph.kept)
    ax.set_title(f"{title}\nkept {len(graph.kept)} of {len(graph.nodes)} components ({pruned} replaced by their "
                 f"optimal-ablation constant; accuracy {graph.pruned_accuracy:.3f}). Blue: heads, orange: MLPs", fontsize=9)
    ax.set_xlim(-1.8, (n_cols - 1) * 3.4 + 1.8)
    ax.set_ylim(-(n_rows - 1) * 1.5 - 1.0, 1.2)
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _short(text: str, width: int = 48) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."
