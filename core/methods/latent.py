"""Latent interventions for generative models: traversals, encoding and decoding through the engine.

Built only on the engine and the site vocabulary, so everything here works for any adapter whose
catalog has latent sites (``latent.z``, ``latent.mu`` ...) and whose output is what you want to look at
(the VAE adapter's output is the reconstruction). The interventions are the ordinary ones:
``do(z_i = v)`` is :class:`~crosspatch.interventions.Set`, a shift is
:class:`~crosspatch.interventions.Add`, an interchange is :class:`~crosspatch.interventions.Patch`.

    from crosspatch.methods.latent import latent_traversal, traversal_grid, traversal_figure
    frames = latent_traversal(m, images, "latent.z[dim=3]", [-2, -1, 0, 1, 2])   # [5, n, 3, 32, 32]
    grid = traversal_grid(m, images[:1], "latent.z", [-2, 0, 2])                 # [latents, 3, 1, 3, 32, 32]
    traversal_figure(grid[:, :, 0]).savefig("traversals.png")

Inputs are whatever the adapter takes: images (encode, intervene, decode) or, with the VAE
adapter, ``{"latents": z}`` for decode-only runs, which skip the encoder (see :func:`decoder_inputs`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Literal, Sequence

import torch
from torch import nn

from ..engine.adapter import batch_size as rows_of, repeat_rows
from ..engine.forward import Bound, execute
from ..engine.interventions import Add, Intervention, Set
from ..engine.model import WrappedModel, wrap
from ..progress import progress_bar
from ..sites.site import ANY, Site, SiteError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "UnitSweep", "decode", "decoder_inputs", "encode", "latent_traversal", "output_distance", "reconstruct",
    "run_jobs", "traversal_figure", "traversal_grid", "unit_sweep",
]

Distance = Literal["abs", "sq"]


# ------------------------------------------------------------------ encode / decode


def encode(model: "WrappedModel | nn.Module", images: Any, site: str = "latent.z") -> torch.Tensor:
    """The activation at ``site`` (default the latent the decoder receives) for ``images``."""
    m = wrap(model)
    key = m.catalog.resolve(site).key
    return m.capture(images, key)[key]


def decoder_inputs(model: "WrappedModel | nn.Module", images: Any, site: str = "latent.z") -> dict[str, torch.Tensor]:
    """``{"latents": z}`` for ``images``: inputs for decode-only runs, so sweeps skip the encoder."""
    return {"latents": encode(model, images, site)}


def decode(model: "WrappedModel | nn.Module", latents: torch.Tensor) -> torch.Tensor:
    """The model's output for a decode-only run on ``latents`` (``{"latents": z}``)."""
    return wrap(model).run({"latents": latents}).output


def reconstruct(model: "WrappedModel | nn.Module", inputs: Any) -> torch.Tensor:
    """The model's output for ``inputs``, without interventions."""
    return wrap(model).run(inputs).output


def output_distance(a: torch.Tensor, b: torch.Tensor, distance: Distance = "abs") -> torch.Tensor:
    """Elementwise distance between two outputs: ``|a - b|`` (``"abs"``) or ``(a - b)**2`` (``"sq"``)."""
    diff = a - b
    if distance == "abs":
        return diff.abs()
    if distance == "sq":
        return diff * diff
    raise ValueError(f"distance must be 'abs' or 'sq', got {distance!r}")


# ------------------------------------------------------------------ unit sweeps


@dataclass(frozen=True)
class UnitSweep:
    """The sites of one family taken one unit at a time along its first axis (latent ``dim``, block
    ``channel``), with the result dim name (``"latent"`` for latent families) and the unit labels."""

    sites: tuple[Site, ...]
    dim: str
    labels: list
    key: str

    def __len__(self) -> int:
        return len(self.sites)


def unit_sweep(model: "WrappedModel | nn.Module", site: "str | Site", prepared: dict | None = None) -> UnitSweep:
    """Expand ``site`` into one site per unit of its family's first axis.

    ``"latent.z"`` -> ``latent.z[dim=0]``, ``latent.z[dim=1]``, ...; a site that selects the first
    axis already (``latent.z[dim={0,3}]``, ``latent.z[dim=*]``) is expanded as written. When the axis
    size is not in the catalog (block channels of differing widths), one capture on ``prepared``'s first
    row measures it.
    """
    m = wrap(model)
    sizes = m.adapter.sizes(prepared) if prepared is not None else {}
    resolved = m.catalog.resolve(site, sizes)
    if resolved.is_pattern and resolved.layer == ANY:
        raise SiteError(f"site {resolved}: give one layer (a unit sweep runs along one axis of one activation)")
    fam = m.catalog.family(resolved.family)
    axis = fam.axes[0]
    if axis.name not in resolved.selection:
        resolved = resolved.with_(**{axis.name: ANY})
    if resolved.selection[axis.name] == ANY and axis.size is None and axis.name not in sizes:
        if prepared is None:
            raise SiteError(f"site {resolved}: the size of axis {axis.name!r} is not in the catalog; pass inputs")
        first = {k: (v[:1] if isinstance(v, torch.Tensor) and v.ndim else v) for k, v in prepared.items()}
        captured = execute(m.module, m.adapter, m.catalog, first, capture=[resolved.key]).cache[resolved.key]
        sizes = {**sizes, axis.name: captured.shape[1]}
    sweep = m.catalog.expand(resolved, sizes)
    if len(sweep.dims) > 1:
        raise SiteError(f"site {resolved}: a unit sweep runs along one axis; {sweep.dims} have '*'")
    labels = sweep.coords[sweep.dims[0]] if sweep.dims else [str(resolved)]
    dim = "latent" if fam.name.startswith("latent.") else (sweep.dims[0] if sweep.dims else "site")
    return UnitSweep(sweep.sites, dim, labels, resolved.key)


def _intervention(kind: str, value: Any) -> Intervention:
    if kind == "set":
        return Set(value)
    if kind == "add":
        return Add(value)
    raise ValueError(f"intervention must be 'set' (do(z_i = v)) or 'add' (z_i + v), got {kind!r}")


def _value_list(values: Any) -> list:
    if isinstance(values, torch.Tensor):
        values = values.tolist() if values.ndim <= 1 else list(values)
    values = list(values)
    if not values:
        raise ValueError("values is empty; give the values to set (or add) the latent to")
    return values


def run_jobs(
    m: WrappedModel,
    prepared: dict,
    jobs: Sequence[Sequence[tuple[Site, Intervention]]],
    *,
    batch_size: int | None,
    progress: bool | None,
    desc: str,
    align: int = 1,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Run ``jobs`` in batched forwards; yield ``(index of the chunk's first job, outputs [jobs, n, *out])``.

    A job is a list of ``(site, intervention)`` applied together to its own copy of the ``n`` input
    rows. A forward holds up to ``batch_size`` rows (``None``: every job in one forward), in whole
    groups of ``align`` jobs so that callers can reduce over a group within one chunk.
    """
    n = rows_of(prepared)
    if batch_size is None:
        per_forward = len(jobs)
    else:
        per_forward = max(align, (batch_size // max(1, n * align)) * align)
    for start in progress_bar(range(0, len(jobs), per_forward), progress, desc=desc):
        chunk = jobs[start : start + per_forward]
        inputs = repeat_rows(prepared, len(chunk))
        bounds = [Bound(site, iv, slice(j * n, (j + 1) * n)) for j, job in enumerate(chunk) for site, iv in job]
        out = execute(m.module, m.adapter, m.catalog, inputs, bounds).output
        yield start, out.view(len(chunk), n, *out.shape[1:])


# ------------------------------------------------------------------ traversals


def latent_traversal(
    model: "WrappedModel | nn.Module",
    inputs: Any,
    site: "str | Site",
    values: Any,
    *,
    intervention: Literal["set", "add"] = "set",
    batch_size: int | None = None,
    progress: bool | None = None,
) -> torch.Tensor:
    """Outputs with ``site`` set to (or shifted by) each of ``values``: ``[len(values), n, *output]``.

    ``site`` is one concrete site, e.g. ``"latent.z[dim=3]"``; each value is broadcast over the
    selection like :class:`~crosspatch.interventions.Set`'s value (a float sets every selected
    element; for a spatial latent ``latent.z[dim=1]`` sets the whole channel). All values run in one
    forward along the batch axis (``batch_size`` rows at most per forward if given).
    """
    m = wrap(model)
    prepared = m.prepare(inputs)
    concrete = m.catalog.resolve(site, m.adapter.sizes(prepared))
    if concrete.is_pattern:
        raise SiteError(f"latent_traversal takes one site, got the pattern {concrete}; use traversal_grid for many")
    values = _value_list(values)
    jobs = [[(concrete, _intervention(intervention, v))] for v in values]
    outs = [out for _, out in run_jobs(m, prepared, jobs, batch_size=batch_size, progress=progress,
                                       desc=f"traversing {concrete}")]
    return torch.cat(outs)


def traversal_grid(
    model: "WrappedModel | nn.Module",
    inputs: Any,
    site: "str | Site" = "latent.z",
    values: Any = (-2.0, -1.0, 0.0, 1.0, 2.0),
    *,
    intervention: Literal["set", "add"] = "set",
    batch_size: int | None = 1024,
    progress: bool | None = None,
) -> torch.Tensor:
    """Traversals of every unit of ``site`` (every latent of ``latent.z`` by default):
    ``[units, len(values), n, *output]``, units in the order of :func:`unit_sweep`."""
    m = wrap(model)
    prepared = m.prepare(inputs)
    sweep = unit_sweep(m, site, prepared)
    values = _value_list(values)
    jobs = [[(s, _intervention(intervention, v))] for s in sweep.sites for v in values]
    outs = [out for _, out in run_jobs(m, prepared, jobs, batch_size=batch_size, progress=progress,
                                       desc=f"traversing {len(sweep)} units of {sweep.key}")]
    out = torch.cat(outs)
    return out.view(len(sweep), len(values), *out.shape[1:])


def traversal_figure(
    images: torch.Tensor,
    *,
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    title: str | None = None,
    header: Sequence[tuple[str, torch.Tensor]] | None = None,
    value_range: tuple[float, float] = (0.0, 1.0),
    cell: float = 0.9,
) -> "Figure":
    """A grid of images ``[rows, cols, C, H, W]`` (C = 1 or 3), e.g. latents x traversal values.

    ``header`` puts labelled images (``[C, H, W]``, e.g. the input and its reconstruction) in a row
    above the grid. Values are clipped to ``value_range`` and mapped to [0, 1] for display. Uses no
    pyplot state.
    """
    from matplotlib.figure import Figure

    if images.ndim != 5 or images.shape[2] not in (1, 3):
        raise ValueError(f"traversal_figure takes images [rows, cols, 1 or 3, H, W], got {tuple(images.shape)}")
    lo, hi = value_range

    def pixels(t: torch.Tensor):
        return ((t.detach().float().cpu() - lo) / (hi - lo)).clamp(0, 1).movedim(-3, -1).numpy()

    grid = pixels(images)
    rows, cols = grid.shape[:2]
    chars = max((len(line) for r in row_labels for line in str(r).split("\n")), default=0) if row_labels else 0
    left = 0.15 + (0.25 + 0.075 * chars if row_labels is not None else 0.0)  # ~0.075 in per character at 9 pt
    title_h = 0.2 + 0.22 * (title.count("\n") + 1) if title else 0.1
    header_h = (cell + 0.45) if header else 0.0
    labels_h = 0.28 if col_labels is not None else 0.05
    top = title_h + header_h + labels_h
    fig = Figure(figsize=(left + max(cols, len(header or ())) * cell + 0.15, top + rows * cell + 0.15))
    width, height = fig.get_figwidth(), fig.get_figheight()

    def draw(img, x0: float, y0: float):  # (x0, y0): top-left corner in inches from the top-left
        ax = fig.add_axes((x0 / width, 1 - (y0 + cell * 0.94) / height, cell * 0.94 / width, cell * 0.94 / height))
        ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None,
                  vmin=0, vmax=1, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        return ax

    for c, (label, img) in enumerate(header or ()):
        ax = draw(pixels(img), left + c * cell, title_h + 0.25)
        ax.set_title(str(label), fontsize=9, pad=3)
    for r in range(rows):
        for c in range(cols):
            ax = draw(grid[r, c], left + c * cell, top + r * cell)
            if c == 0 and row_labels is not None:
                ax.set_ylabel(str(row_labels[r]), rotation=0, ha="right", va="center", fontsize=9, labelpad=6)
            if r == 0 and col_labels is not None:
                ax.set_title(str(col_labels[c]), fontsize=9, pad=3)
    if title:
        fig.suptitle(title, y=1 - 0.1 / height, va="top", fontsize=10.5)
    return fig
