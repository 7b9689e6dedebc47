"""A picture of a localisation (``plot_localization``): where the effect is at the (layer, position) level,
and the finest level's top sites with what was patched exactly and what is an estimate within its bound.

Kept apart from :mod:`crosspatch.methods.localize` so that module stays the rule; matplotlib is imported when a
figure is drawn.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ..sites.site import Site

if TYPE_CHECKING:
    from .localize import Localization

__all__ = ["plot_localization"]


def plot_localization(loc: "Localization", k: int | None = None, *, title: str | None = None) -> Any:
    """A matplotlib Figure: one layer x position map per pattern of the ``layer_pos`` level (when walked),
    the value of every cell, a dot on the cells patched exactly; and the finest level's ``k`` largest sites
    (default: the ``k`` localize was given, else 20) as bars, solid where patched exactly, hatched where the
    value is AtP's estimate, with the estimate's bound (``|estimate| (1 + rho)``) as an error bar and the
    level's final threshold dotted (the axis linear within it, logarithmic beyond): an unverified site whose
    bar and bound stay inside the threshold is one the rule showed cannot reach the top."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    k = k or loc.metadata.get("k") or 20
    maps = [p for p in loc.metadata["patterns"].get("layer_pos", []) if loc.sweeps[p].dims == ("layer", "pos")]
    finest = list(loc.levels)[-1]
    figure = Figure(figsize=(4.2 * len(maps) + 6.0, max(3.6, 0.26 * k + 1.4)), layout="constrained")
    axes = figure.subplots(1, len(maps) + 1, width_ratios=[1.0] * len(maps) + [1.3], squeeze=False)[0]
    scale = max([float(np.nanmax(np.abs(loc.sweeps[p].values), initial=0.0)) for p in maps] + [1e-12])
    cmap = colormaps["RdBu"]
    for ax, pattern in zip(axes, maps):
        res = loc.sweeps[pattern]
        image = ax.imshow(res.values, cmap=cmap, vmin=-scale, vmax=scale, aspect="auto", interpolation="nearest")
        done = np.array(res.metadata["verified"], dtype=bool) & ~np.array(res.metadata["skipped"], dtype=bool)
        rows, cols = np.nonzero(done)
        ax.scatter(cols, rows, s=6, c="k", marker="o", linewidths=0)
        ax.set_title(f"{pattern} (dot: patched)", fontsize=9)
        ax.set_xticks(range(len(res.coords["pos"])), [str(p) for p in res.coords["pos"]], rotation=90, fontsize=6)
        ax.set_yticks(range(len(res.coords["layer"])), [str(layer) for layer in res.coords["layer"]], fontsize=7)
        ax.set_xlabel("position")
        ax.set_ylabel("layer")
    if maps:
        figure.colorbar(image, ax=list(axes[: len(maps)]), shrink=0.8, label=_unit(loc))
    _top_bars(axes[-1], loc, finest, k)
    spent = f"{loc.forwards} forwards"
    sweep = loc.metadata.get("sweep_forwards")
    if sweep:
        spent += f", {100 * loc.forwards / sweep:.1f} % of the exhaustive sweep's {sweep}"
    figure.suptitle(f"{title + ': ' if title else ''}localize ({spent})", fontsize=10)
    return figure


def _top_bars(ax: Any, loc: "Localization", level: str, k: int) -> None:
    res = loc.levels[level]
    meta = res.metadata
    order = np.argsort(-np.abs(res.values), kind="stable")[:k]
    sites = [res.coords["site"][i] for i in order]
    values = res.values[order]
    verified = np.array(meta["verified"], dtype=bool)[order]
    estimates = np.array(meta["estimate"])[order]
    rho = meta["rho"]
    bounds = np.array([abs(e) * (1 + rho.get(Site.parse(s).family, 0.0)) for s, e in zip(sites, estimates)])
    y = np.arange(len(sites))[::-1]
    colours = np.where(values >= 0, "tab:blue", "tab:red")
    ax.barh(y[verified], values[verified], color=colours[verified], edgecolor="0.2", linewidth=0.4,
            label="patched exactly")
    if (~verified).any():
        signs = np.sign(values[~verified])
        ax.barh(y[~verified], values[~verified], color="white", edgecolor=colours[~verified], hatch="///",
                linewidth=0.8, label="AtP estimate (bound: whisker)")
        ax.hlines(y[~verified], values[~verified], signs * bounds[~verified], color="0.3", linewidth=0.8)
        ax.plot(signs * bounds[~verified], y[~verified], "|", color="0.3", markersize=8)
    threshold = meta["threshold"]
    for x in (threshold, -threshold):
        ax.axvline(x, color="0.4", linestyle=":", linewidth=0.8)
    ax.axvline(0.0, color="0.2", linewidth=0.6)
    if threshold > 0:  # linear inside the threshold, logarithmic beyond: a 0.9 site and a 0.01 one both readable
        ax.set_xscale("symlog", linthresh=threshold)
    ax.set_yticks(y, sites, fontsize=7)
    ax.set_xlabel(_unit(loc) + (" (symlog, linear within the threshold)" if threshold > 0 else ""))
    ax.set_title(f"{level}: top {len(sites)} (threshold {threshold:.3g}, dotted)", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")


def _unit(loc: "Localization") -> str:
    return f"{loc.metadata['metric']}" + (" / gap" if loc.metadata.get("normalize") else "")
