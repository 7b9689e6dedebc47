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

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["Result", "collect_versions"]

FORMAT = "crosspatch.result"
FORMAT_VERSION = 1

_MAX_TICKS = 30
_AUTO_ANNOTATE_CELLS = 150
_NAN_COLOUR = "0.6"
_OPTIONAL_LIBRARIES = ("transformers", "diffusers", "open_clip")


@dataclass(repr=False)
class Result:
    """A labelled float64 array plus the metadata needed to reproduce it.

    `coords` maps a dim to its labels (ints or strs); dims left out get
    `range(n)`. `metadata` holds model, adapter, method, metric, seed,
    versions, ... and must be JSON-able (see `save`).
    """

    values: np.ndarray
    dims: tuple[str, ...]
    coords: dict[str, list] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)

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
        """Pick one label along each named dim, dropping those dims."""
        index: list[Any] = [slice(None)] * len(self.dims)
        for dim, label in labels.items():
            axis = self._axis(dim)
            matches = [i for i, existing in enumerate(self.coords[dim]) if existing == label]
            if not matches:
                raise KeyError(f"label {label!r} not in dim {dim!r}; labels are {_preview(self.coords[dim])}")
            if len(matches) > 1:
                raise ValueError(f"label {label!r} appears {len(matches)} times in dim {dim!r}; it is ambiguous")
            index[axis] = matches[0]
        return self._drop(labels, self.values[tuple(index)])

    def mean(self, dim: str) -> Result:
        """Average over one named dim, dropping it."""
        return self._drop([dim], self.values.mean(axis=self._axis(dim)))

    def _axis(self, dim: str) -> int:
        if dim not in self.dims:
            raise KeyError(f"no dim {dim!r}; dims are {list(self.dims)}")
        return self.dims.index(dim)

    def _drop(self, dropped: Any, values: np.ndarray) -> Result:
        kept = tuple(d for d in self.dims if d not in dropped)
        return Result(values, kept, {d: list(self.coords[d]) for d in kept}, dict(self.metadata))

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
        path.write_text(json.dumps(document, allow_nan=False), encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> Result:
        """Read a file written by `save`; the ".json" suffix may be omitted."""
        path = Path(path)
        if not path.is_file():
            path = _with_suffix(path, ".json")
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not a crosspatch result: invalid JSON ({error})") from error
        if not isinstance(document, dict) or document.get("format") != FORMAT:
            raise ValueError(f"{path} is not a crosspatch result (expected format {FORMAT!r})")
        if document.get("version", 0) > FORMAT_VERSION:
            raise ValueError(
                f"{path} has result format version {document['version']}; "
                f"this crosspatch reads up to {FORMAT_VERSION}"
            )
        dims = document["dims"]
        coords = document["coords"]
        shape = tuple(len(coords[d]) for d in dims)  # keeps empty axes that nested lists lose
        values = np.array(_decode(document["values"]), dtype=np.float64).reshape(shape)
        return cls(values, tuple(dims), coords, document["metadata"])

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

        if self.values.ndim == 2:
            image = ax.imshow(data, cmap=colormap, norm=norm, aspect="auto", interpolation="nearest")
            figure.colorbar(image, ax=ax, label=label)
            _ticks(ax.yaxis, self.coords[self.dims[0]])
            _ticks(ax.xaxis, self.coords[self.dims[1]], rotate=True)
            ax.set_ylabel(self.dims[0])
            ax.set_xlabel(self.dims[1])
            if annotate or (annotate is None and data.size <= _AUTO_ANNOTATE_CELLS):
                _annotate(ax, self.values, norm)
        else:
            positions = np.arange(data.size)
            ax.bar(positions, np.nan_to_num(data), color=colormap(norm(data)), edgecolor="0.35", linewidth=0.5)
            ax.axhline(0.0, color="0.2", linewidth=0.8)
            for position in positions[np.isnan(data)]:
                ax.text(position, 0.0, "nan", ha="center", va="bottom", fontsize=7, color=_NAN_COLOUR)
            ax.set_xlim(-0.6, data.size - 0.4)
            _ticks(ax.xaxis, self.coords[self.dims[0]], rotate=True)
            ax.set_xlabel(self.dims[0])
            ax.set_ylabel(label)

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
    """Label an axis with coordinate labels, showing at most ~_MAX_TICKS of them."""
    needed = max(1, math.ceil(len(labels) / _MAX_TICKS))
    magnitude = 10 ** math.floor(math.log10(needed))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= needed)  # 1, 2, 5, 10, 20, ...
    positions = list(range(0, len(labels), step))
    texts = [str(labels[i]) for i in positions]
    axis.set_ticks(positions, texts)
    wordy = any(isinstance(labels[i], str) and len(labels[i]) > 2 for i in positions)
    if rotate and (wordy or len(positions) > 20):
        axis.set_tick_params(labelrotation=90)


def _annotate(ax: Axes, values: np.ndarray, norm: Any) -> None:
    """Write each cell's value, in white where the colour is dark."""
    for (row, col), value in np.ndenumerate(values):
        if np.isnan(value):
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
