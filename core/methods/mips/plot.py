"""The lattice plot: hidden states in the normalised basis, coloured by the network's output."""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["plot_states"]


def plot_states(
    points: np.ndarray,
    outputs: np.ndarray,
    path: Path,
    title: str,
    lattice_points: np.ndarray | None = None,
    labels: list[str] | None = None,
    axis: str = "normalised hidden coordinate",
) -> Path:
    """Scatter ``points [N, n]`` (first two coordinates; one coordinate against the output when
    ``n = 1``), coloured by ``outputs``, with ``lattice_points`` as rings labelled by ``labels``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.5), dpi=110)
    pts = np.asarray(points, dtype=np.float64)
    two_d = pts.shape[1] >= 2
    xs = pts[:, 0]
    ys = pts[:, 1] if two_d else np.asarray(outputs, dtype=np.float64)
    sc = ax.scatter(xs, ys, c=outputs, s=14, cmap="viridis", alpha=0.7, linewidths=0)
    if lattice_points is not None and len(lattice_points):
        lp = np.asarray(lattice_points, dtype=np.float64)
        if two_d:
            ax.scatter(lp[:, 0], lp[:, 1], s=110 if len(lp) <= 60 else 30, facecolors="none", edgecolors="crimson",
                       linewidths=1.2 if len(lp) <= 60 else 0.6, label="lattice / machine states")
        else:
            ax.vlines(lp[:, 0], 0, 1, transform=ax.get_xaxis_transform(), color="crimson", lw=0.6, alpha=0.5)
            ax.plot([], [], color="crimson", lw=0.6, label="lattice / machine states")
        every = -(-len(lp) // 10)
        low = float(np.min(ys)) if len(ys) else 0.0
        for i, text in enumerate((labels or [])[: len(lp)]):
            if i % every == 0:
                at = (lp[i, 0], lp[i, 1] if two_d else low)
                ax.annotate(text, at, textcoords="offset points", xytext=(4, 6), fontsize=7, color="crimson")
        ax.legend(loc="best", fontsize=7)
    ax.set_xlabel(f"{axis} 1")
    ax.set_ylabel(f"{axis} 2" if two_d else "network output")
    fig.colorbar(sc, ax=ax, label="network output")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
