"""The one labelled result type that every crosspatch method returns.

A `Result` is a float64 array whose axes have names (`dims`) and labels
(`coords`), plus JSON-able `metadata` describing how it was produced. Keeping
one type means plotting, saving, tabulating and slicing work the same for
every method and every model family.
"""

from __future__ import annotations

import functools
import json
import math
import platform
import textwrap
import sys
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .formats import FormatError, json_field, read_versioned

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["Result", "collect_versions"]

FORMAT = "crosspatch.result"
FORMAT_VERSION = 1

_ALL_TICKS = 64  # every label is drawn up to this many; beyond, every 2nd, 5th, 10th ... so that at most this many are
_AUTO_ANNOTATE_CELLS = 150
_NAN_COLOUR = "0.6"
_OPTIONAL_LIBRARIES = ("transformers", "diffusers", "open_clip")


@dataclass(repr=False)
class Result:
    """A labelled float64 array plus the metadata needed to reproduce it.

    `coords` maps a dim to its labels (ints or strs); dims left out get
    `range(n)`. A `pos` dim of a model with a tokenizer is labelled with the
    tokens ("3 John": index and token; `sel(pos=3)` still works). `metadata`
    holds model, adapter, method, metric, seed, versions, ... and must be
    JSON-able (see `save`). `skipped`, when given, is a boolean array shaped
    like `values`: True where a site was not run because its effect is 0 by
    construction (drawn hatched, not as a computed zero; saved with the result).
    """

    values: np.ndarray
    dims: tuple[str, ...]
    coords: dict[str, list] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    skipped: np.ndarray | None = None

    def __post_init__(self) -> None:
        if hasattr(self.values, "detach"):  # a torch tensor, possibly bf16 or on GPU
            self.values = self.values.detach().cpu().double().numpy()
        self.values = np.array(self.values, dtype=np.float64)
        self.dims = (self.dims,) if isinstance(self.dims, str) else tuple(self.dims)
        self.metadata = dict(self.metadata)

        if len(self.dims) != self.values.ndim:
            raise ValueError(
                f"dims {self.dims} name {len(self.dims)} axes but values has "
                f"{self.values.ndim} (shape {self.values.shape})"
            )
        if len(set(self.dims)) != len(self.dims):
            raise ValueError(f"dims must be unique, got {self.dims}")
        if "value" in self.dims:
            raise ValueError("'value' cannot be a dim name: it is the value column of to_pandas()")
        unknown = [key for key in self.coords if key not in self.dims]
        if unknown:
            raise ValueError(f"coords given for unknown dims {unknown}; dims are {list(self.dims)}")

        coords = {}
        for dim, size in zip(self.dims, self.values.shape):
            labels = _labels(self.coords[dim]) if dim in self.coords else list(range(size))
            if len(labels) != size:
                raise ValueError(
                    f"coords[{dim!r}] has {len(labels)} labels but values has size {size} along {dim!r}"
                )
            coords[dim] = labels
        self.coords = coords
        if self.skipped is not None:
            self.skipped = np.array(self.skipped, dtype=bool)
            if self.skipped.shape != self.values.shape:
                raise ValueError(
                    f"skipped has shape {self.skipped.shape} but values has {self.values.shape}; it marks each value"
                )

    # ------------------------------------------------------------------ views

    def __repr__(self) -> str:
        shape = ", ".join(f"{dim}={size}" for dim, size in zip(self.dims, self.values.shape))
        parts = [f"dims=({shape})"]
        if self.values.ndim == 0:
            parts.append(f"value={self.values.item():.6g}")
        parts += [f"{key}={self.metadata[key]}" for key in ("method", "metric") if key in self.metadata]
        return f"Result({', '.join(parts)})"

    def __eq__(self, other: object) -> bool:
        """Equal when dims, coords, metadata and values match (NaN equals NaN)."""
        if not isinstance(other, Result):
            return NotImplemented
        return (
            self.dims == other.dims
            and self.coords == other.coords
            and self.metadata == other.metadata
            and self.values.shape == other.values.shape
            and bool(np.array_equal(self.values, other.values, equal_nan=True))
            and (self.skipped is None) == (other.skipped is None)
            and (self.skipped is None or bool(np.array_equal(self.skipped, other.skipped)))
        )

    def to_pandas(self) -> pd.DataFrame:
        """Long-form table: one column per dim holding its labels, plus "value"."""
        import pandas as pd

        if not self.dims:
            return pd.DataFrame({"value": [self.values.item()]})
        index = pd.MultiIndex.from_product([self.coords[d] for d in self.dims], names=list(self.dims))
        frame = index.to_frame(index=False)
        frame["value"] = self.values.reshape(-1)
        return frame

    def to_csv(self, path: str | Path) -> Path:
        """Write `to_pandas()` as CSV (adds ".csv" if missing) and return the path."""
        path = _with_suffix(path, ".csv")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.to_pandas().to_csv(path, index=False)
        return path

    # -------------------------------------------------------------- selection

    def sel(self, **labels: Any) -> Result:
        """Pick one label along each named dim, dropping those dims. An int picks the position of a dim
        labelled "3 John"-style (index, then the token)."""
        index: list[Any] = [slice(None)] * len(self.dims)
        for dim, label in labels.items():
            axis = self._axis(dim)
            matches = [i for i, existing in enumerate(self.coords[dim]) if existing == label]
            if not matches and isinstance(label, int) and not isinstance(label, bool):
                prefix = f"{label} "
                matches = [i for i, existing in enumerate(self.coords[dim])
                           if isinstance(existing, str) and existing.startswith(prefix)]
            if not matches:
                raise KeyError(f"label {label!r} not in dim {dim!r}; labels are {_preview(self.coords[dim])}")
            if len(matches) > 1:
                raise ValueError(f"label {label!r} appears {len(matches)} times in dim {dim!r}; it is ambiguous")
            index[axis] = matches[0]
        skipped = self.skipped
        return self._drop(labels, self.values[tuple(index)], None if skipped is None else skipped[tuple(index)])

    def mean(self, dim: str) -> Result:
        """Average over one named dim, dropping it (a mean is skipped only where every site in it was)."""
        axis = self._axis(dim)
        skipped = self.skipped
        return self._drop([dim], self.values.mean(axis=axis), None if skipped is None else skipped.all(axis=axis))

    def _axis(self, dim: str) -> int:
        if dim not in self.dims:
            raise KeyError(f"no dim {dim!r}; dims are {list(self.dims)}")
        return self.dims.index(dim)

    def _drop(self, dropped: Any, values: np.ndarray, skipped: np.ndarray | None = None) -> Result:
        kept = tuple(d for d in self.dims if d not in dropped)
        return Result(values, kept, {d: list(self.coords[d]) for d in kept}, dict(self.metadata), skipped)

    # ---------------------------------------------------------------- storage

    def save(self, path: str | Path) -> Path:
        """Write strict JSON (adds ".json" if missing, creates parent dirs); return the path.

        Values round-trip exactly: finite floats use Python's shortest exact repr,
        NaN is stored as null and infinities as the strings "inf"/"-inf".
        """
        path = _with_suffix(path, ".json")
        path.parent.mkdir(parents=True, exist_ok=True)
        document = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "dims": list(self.dims),
            "coords": _jsonable(self.coords),
            "values": _encode(self.values.tolist()),
            "metadata": _jsonable(self.metadata),
        }
        if self.skipped is not None:
            document["skipped"] = self.skipped.tolist()
        path.write_text(json.dumps(document, allow_nan=False), encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> Result:
        """Read a file written by `save`; the ".json" suffix may be omitted.

        Anything malformed in the file is a :class:`~crosspatch.results.formats.FormatError` naming the
        file and the field.
        """
        path = Path(path)
        if not path.is_file():
            path = _with_suffix(path, ".json")
        if not path.is_file():
            raise FileNotFoundError(f"no result file {path}")
        document = read_versioned(path, "a crosspatch result", FORMAT, "version", FORMAT_VERSION)
        dims = json_field(document, "dims", list, path)
        if not all(isinstance(d, str) for d in dims):
            raise FormatError(f"{path}: field 'dims' should be a list of strings, got {dims!r}")
        coords = json_field(document, "coords", dict, path)
        for d in dims:
            if not isinstance(coords.get(d), list):
                raise FormatError(f"{path}: field 'coords' should hold a list of labels for dim {d!r}")
        metadata = json_field(document, "metadata", dict, path, {})
        shape = tuple(len(coords[d]) for d in dims)  # keeps empty axes that nested lists lose
        try:
            values = np.array(_decode(json_field(document, "values", (list, int, float, type(None)), path)), dtype=np.float64)
            values = values.reshape(shape)
        except (TypeError, ValueError) as exc:
            raise FormatError(f"{path}: field 'values' does not hold numbers of shape {shape} (the coords' sizes): {exc}") from None
        skipped = json_field(document, "skipped", (list, bool, type(None)), path, None)
        if skipped is not None:
            try:
                skipped = np.array(skipped, dtype=bool).reshape(shape)
            except ValueError:
                raise FormatError(f"{path}: field 'skipped' should be true/false values of shape {shape}") from None
        try:
            return cls(values, tuple(dims), coords, metadata, skipped)
        except ValueError as exc:
            raise FormatError(f"{path}: {exc}") from None

    # ------------------------------------------------------------ interactive

    def to_html(self, title: str | None = None) -> str:
        """One self-contained interactive HTML page (no network): a heatmap with hover values and a
        click breakdown, bars, attention patterns per head, an edge graph with a pruning slider or a
        faithfulness table, as the dims and method call for (:mod:`crosspatch.results.html`)."""
        from .html.page import page_html, _title

        name = _title(self) if title is None else title
        return page_html({name: self}, title=name)

    def _repr_html_(self) -> str:
        """Jupyter shows the interactive page inline, in a sandboxed frame."""
        from .html.page import repr_html

        return repr_html(self)

    # --------------------------------------------------------------- plotting

    def plot(
        self,
        ax: Axes | None = None,
        *,
        title: str | None = None,
        cmap: Any = "RdBu_r",
        annotate: bool | None = None,
    ) -> Figure:
        """Heatmap (2-D) or signed bar chart (1-D), colours centred on zero.

        Uses no pyplot state, so it is safe headless and in threads. `annotate`
        writes values into heatmap cells; by default only for small grids.
        Pass `ax` to draw into an existing axes; its figure is returned.
        """
        import matplotlib
        from matplotlib.colors import Normalize
        from matplotlib.figure import Figure

        if self.values.ndim not in (1, 2):
            raise ValueError(
                f"plot() draws 1-D or 2-D results, this one has dims {self.dims}; "
                "reduce it with .sel(dim=label) or .mean(dim) first"
            )
        if ax is None:
            figure = Figure(figsize=self._figsize(), layout="constrained")
            ax = figure.add_subplot()
        figure = ax.figure

        finite = self.values[np.isfinite(self.values)]
        limit = float(np.abs(finite).max()) if finite.size else 0.0
        limit = limit or 1.0
        # Infinities draw as saturated colours; only NaN is "missing".
        data = np.clip(self.values, -limit, limit)
        colormap = matplotlib.colormaps.get_cmap(cmap).with_extremes(bad=_NAN_COLOUR)
        norm = Normalize(-limit, limit)
        label = str(self.metadata.get("metric", "value"))
        if self.metadata.get("normalize"):
            label += " (normalised)"

        skipped = self.skipped
        if skipped is not None and not skipped.any():
            skipped = None
        if self.values.ndim == 2:
            shown = data if skipped is None else np.ma.masked_where(skipped, data)
            image = ax.imshow(shown, cmap=colormap, norm=norm, aspect="auto", interpolation="nearest")
            figure.colorbar(image, ax=ax, label=label)
            _ticks(ax.yaxis, self.coords[self.dims[0]])
            _ticks(ax.xaxis, self.coords[self.dims[1]], rotate=True)
            ax.set_ylabel(self.dims[0])
            ax.set_xlabel(self.dims[1])
            if skipped is not None:
                _hatch_cells(ax, skipped)
            if annotate or (annotate is None and data.size <= _AUTO_ANNOTATE_CELLS):
                _annotate(ax, self.values, norm, skipped)
        else:
            positions = np.arange(data.size)
            colours = colormap(norm(data))
            ax.bar(positions, np.nan_to_num(data), color=colours, edgecolor="0.35", linewidth=0.5)
            ax.axhline(0.0, color="0.2", linewidth=0.8)
            for position in positions[np.isnan(data)]:
                ax.text(position, 0.0, "nan", ha="center", va="bottom", fontsize=7, color=_NAN_COLOUR)
            if skipped is not None:
                _hatch_bars(ax, positions[skipped], limit)
            ax.set_xlim(-0.6, data.size - 0.4)
            _ticks(ax.xaxis, self.coords[self.dims[0]], rotate=True)
            ax.set_xlabel(self.dims[0])
            ax.set_ylabel(label)
        if skipped is not None:
            _skipped_legend(ax)

        title = self._default_title() if title is None else title
        if title:
            width = int(figure.get_figwidth() * 9)  # characters that fit at the default title size
            ax.set_title("\n".join(textwrap.wrap(title, width)) if len(title) > width else title)
        return figure

    def _figsize(self) -> tuple[float, float]:
        if self.values.ndim == 1:
            return (min(max(4.0, 1.5 + 0.3 * self.values.size), 14.0), 3.5)
        rows, cols = self.values.shape
        return (min(max(5.0, 2.5 + 0.55 * cols), 14.0), min(max(3.5, 1.5 + 0.4 * rows), 10.0))

    def _default_title(self) -> str:
        parts = []
        for key in ("method", "metric", "sites"):
            value = self.metadata.get(key)
            if value is None:
                continue
            parts.append(", ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value))
        return " · ".join(parts)


def collect_versions() -> dict[str, str]:
    """Versions that matter for reproducing a result.

    Optional libraries are reported only if something already imported them;
    importing them here would be slow and could have side effects.
    """
    versions = {
        "python": platform.python_version(),
        "crosspatch": _distribution_version("crosspatch"),
        "torch": _module_version("torch", "torch"),
        "numpy": np.__version__,
    }
    distributions = {"open_clip": "open_clip_torch"}
    for name in _OPTIONAL_LIBRARIES:
        if name in sys.modules:
            versions[name] = _module_version(name, distributions.get(name, name))
    return versions


# ------------------------------------------------------------------- helpers


def _jsonable(value: Any) -> Any:
    """Make metadata JSON-able: numpy -> Python, tuples/sets -> lists, anything else -> str."""
    if isinstance(value, np.generic | np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(item) for item in value]
    if isinstance(value, set | frozenset):
        return [_jsonable(item) for item in sorted(value, key=str)]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # strict JSON has no NaN/inf
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def _encode(values: Any) -> Any:
    """Nested float lists -> strict JSON: NaN -> null, +-inf -> "inf"/"-inf"."""
    if isinstance(values, list):
        return [_encode(item) for item in values]
    if math.isnan(values):
        return None
    if math.isinf(values):
        return "inf" if values > 0 else "-inf"
    return values


def _decode(values: Any) -> Any:
    if isinstance(values, list):
        return [_decode(item) for item in values]
    return math.nan if values is None else float(values)


def _labels(labels: Any) -> list:
    """Coordinate labels as a plain list of Python scalars."""
    if isinstance(labels, np.ndarray):
        return labels.tolist()
    return [label.item() if isinstance(label, np.generic) else label for label in labels]


def _preview(labels: list, limit: int = 20) -> str:
    shown = ", ".join(map(repr, labels[:limit]))
    more = f", ... ({len(labels)} in all)" if len(labels) > limit else ""
    return f"[{shown}{more}]"


def _with_suffix(path: str | Path, suffix: str) -> Path:
    path = Path(path)
    return path if path.suffix.lower() == suffix else path.with_name(path.name + suffix)


def _ticks(axis: Any, labels: list, rotate: bool = False) -> None:
    """Label an axis with coordinate labels: every one up to _ALL_TICKS, else every 2nd, 5th, 10th, ...
    (at most _ALL_TICKS of them); smaller type when there are many."""
    step = 1
    if len(labels) > _ALL_TICKS:
        needed = math.ceil(len(labels) / _ALL_TICKS)
        magnitude = 10 ** math.floor(math.log10(needed))
        step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= needed)  # 1, 2, 5, 10, 20, ...
    positions = list(range(0, len(labels), step))
    texts = [str(labels[i]) for i in positions]
    axis.set_ticks(positions, texts)
    if len(positions) > 40:
        axis.set_tick_params(labelsize=6)
    elif len(positions) > 20:
        axis.set_tick_params(labelsize=7)
    wordy = any(isinstance(labels[i], str) and len(labels[i]) > 2 for i in positions)
    if rotate and (wordy or len(positions) > 20):
        axis.set_tick_params(labelrotation=90)


_SKIPPED_COLOUR = "0.93"
_SKIPPED_HATCH = "////"
_SKIPPED_LABEL = "not run: 0 by construction"


def _hatch_cells(ax: Axes, skipped: np.ndarray) -> None:
    """Grey, hatched cells where a site was not run (its effect is 0 by construction)."""
    from matplotlib.patches import Rectangle

    for row, col in zip(*np.nonzero(skipped)):
        ax.add_patch(Rectangle((col - 0.5, row - 0.5), 1, 1, facecolor=_SKIPPED_COLOUR, edgecolor="0.6",
                               hatch=_SKIPPED_HATCH, linewidth=0))


def _hatch_bars(ax: Axes, positions: np.ndarray, limit: float) -> None:
    """A low grey, hatched bar where a site was not run, so a skipped 0 does not read as a computed one."""
    height = 0.04 * limit
    ax.bar(positions, 2 * height, bottom=-height, color=_SKIPPED_COLOUR, edgecolor="0.6", hatch=_SKIPPED_HATCH,
           linewidth=0.5)


def _skipped_legend(ax: Axes) -> None:
    from matplotlib.patches import Patch

    handle = Patch(facecolor=_SKIPPED_COLOUR, edgecolor="0.6", hatch=_SKIPPED_HATCH, label=_SKIPPED_LABEL)
    ax.legend(handles=[handle], loc="lower left", bbox_to_anchor=(0.0, 1.0), fontsize=7, frameon=False,
              borderaxespad=0.2, handlelength=1.5)


def _annotate(ax: Axes, values: np.ndarray, norm: Any, skipped: np.ndarray | None = None) -> None:
    """Write each cell's value, in white where the colour is dark (nothing in a skipped cell)."""
    for (row, col), value in np.ndenumerate(values):
        if np.isnan(value) or (skipped is not None and skipped[row, col]):
            continue
        colour = "white" if abs(norm(value) - 0.5) > 0.3 else "black"
        ax.text(col, row, f"{value:.2g}", ha="center", va="center", fontsize=8, color=colour)


def _module_version(module: str, distribution: str) -> str:
    version = getattr(sys.modules.get(module), "__version__", None)
    return str(version) if version else _distribution_version(distribution)


@functools.lru_cache(maxsize=None)  # reading a distribution's metadata costs milliseconds; it is fixed per process
def _distribution_version(distribution: str) -> str:
    try:
        return importlib_metadata.version(distribution)
    except importlib_metadata.PackageNotFoundError:
        return "unknown"
