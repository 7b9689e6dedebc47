"""The engine: one forward with captures and interventions, and nothing left behind.

It installs a hook per (family, layer) the run needs, applies every intervention bound to that
site (each to its own rows of the batch, so a sweep runs as one batched forward), captures what
was asked, and removes exactly the handles it installed, also when the forward raises.
Without ``grad`` the run is under ``torch.inference_mode``.

Each run keeps one undo list: every change a reach (or the adapter's forward) makes through
:class:`~crosspatch.engine.reach.Changes` joins it the moment its undo is registered, before the change
(:func:`~crosspatch.engine.reach.collect`), and the run's own frame removes the whole list when anything
below it raises. So a ``KeyboardInterrupt`` at any line of the setup, of an install, of the forward's
wrappers or of the teardown leaves nothing behind. (A ``with`` block, an ``ExitStack`` included, is not
enough: an interrupt at its closing line skips ``__exit__``.) As a net for reaches that install a hook
before registering its undo, a failed run also removes every hook registered on the model's modules
since it started.

Selections are checked against the activation they meet: an empty or out-of-range range is a
:class:`SiteError`, never a run that changes nothing. When the inputs carry an ``attention_mask``,
``pos=last`` is each row's last real token (a source is read at its own rows' last real tokens, by
its cache's mask), and a negative position on rows padded on the right is refused
(:func:`~crosspatch.sites.selection.check_padding`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from .adapter import Adapter, Inputs, batch_size
from .cache import Cache
from ..sites.catalog import Catalog, SiteFamily
from .interventions import ApplyContext, Intervention
from .reach import Handle, aliases, collect, collector, hook_mark, remove_all, remove_hooks_since
from .resume import Prefix, Resume, windowed
from ..sites.selection import (
    at_first, axis_index, check_padding, last_axes, last_columns, put_rows, select, take_rows,
)
from ..sites.site import LAST, Site, SiteError

__all__ = ["Bound", "Run", "execute"]

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class Bound:
    """An intervention bound to a concrete site and to rows of the batch (all rows when None)."""

    site: Site
    intervention: Intervention
    rows: slice | None = None


@dataclass
class Run:
    """What one forward returns: the primary output, the captured activations and the raw output."""

    output: torch.Tensor
    cache: Cache
    raw: Any = None
    prefix: Prefix | None = None  # kept when asked (``keep_prefix``), for resumed runs of the same inputs


@dataclass
class _Plan:
    family: SiteFamily
    layer: int | None
    bounds: list[Bound] = field(default_factory=list)
    written: list[Site] = field(default_factory=list)  # each bound's site before a resumed run's shift
    capture: bool = False
    fired: int = 0
    join: torch.Tensor | None = None  # rows appended to the batch here, before the bounds apply (Resume.joins)


def _grad_mode(grad: bool):
    return torch.enable_grad() if grad else torch.inference_mode()


def execute(
    model: nn.Module,
    adapter: Adapter,
    catalog: Catalog,
    inputs: Inputs,
    bounds: Sequence[Bound] = (),
    capture: Iterable[str] = (),
    grad: bool = False,
    keep_prefix: bool = False,
    resume: Resume | None = None,
    output_at: torch.Tensor | None = None,
    output_only: Iterable[str] = (),
) -> Run:
    """Run ``model`` once on prepared ``inputs`` with ``bounds`` applied and ``capture`` keys stored.

    ``keep_prefix`` also returns what later runs of the same inputs need to start part-way;
    ``resume`` is such a run: it computes only the blocks and positions ``bounds`` can change. Its
    captures hold what it computed: positions ``resume.pos..`` of sites at blocks ``resume.layer..``.
    With ``resume.joins`` the adapter runs the prefix's rows and the other rows of ``inputs`` join at
    their blocks (``bounds`` and ``output_at`` address the rows of the whole batch, joined ones last).
    ``output_at`` (``[rows]``, e.g. :meth:`Metric.positions`): the output is needed at that position of
    each row only; an adapter that can computes it there alone (zeros elsewhere), others everywhere.
    Sites the run reads or writes are computed whole, except ``output_only`` keys: the caller reads
    those at the ``output_at`` positions only (elsewhere their values may be the restricted ones).
    """
    n_rows = batch_size(inputs)
    capture = list(capture)
    if resume is not None and (grad or keep_prefix):
        raise ValueError("a resumed run computes only part of the model: it cannot keep a prefix or take gradients")
    if output_at is not None and tuple(output_at.shape) != (n_rows,):
        raise ValueError(f"output_at holds one position per row: shape ({n_rows},), got {tuple(output_at.shape)}")
    if output_at is not None and resume is not None and resume.pos:
        # The resumed run computes positions resume.pos.. only; positions before it come from the prefix.
        output_at = output_at - resume.pos if bool((output_at >= resume.pos).all()) else None
    plans: dict[str, _Plan] = {}
    mask = _attention_mask(inputs, n_rows)

    def plan_for(site: Site) -> _Plan:
        if site.key not in plans:
            plans[site.key] = _Plan(catalog.family(site.family), site.layer)
        return plans[site.key]

    for bound in bounds:
        site = catalog.resolve(bound.site)
        if site.is_pattern:
            raise SiteError(f"site {site} is a pattern; expand it (Catalog.expand) or use a sweep method")
        fam = catalog.family(site.family)
        if not fam.writable:
            raise SiteError(f"site {site}: family {fam.name!r} can be captured but not intervened on")
        written = site
        if resume is not None:
            site = _resumable(site, bound.intervention, resume, catalog)
        plan = plan_for(site)
        plan.bounds.append(Bound(site, bound.intervention, _check_rows(site, bound.rows, n_rows)))
        plan.written.append(written)
    for key in capture:
        site = catalog.resolve(key)
        if resume is not None:
            _capturable(site, resume, catalog)
        plan_for(site).capture = True
    run_inputs = inputs
    if resume is not None and resume.joins:
        run_inputs = _joining(resume, catalog, plan_for, inputs, n_rows)

    sources = _resolve_sources(model, adapter, catalog, [b for p in plans.values() for b in p.bounds], grad)
    window = resume.pos if resume is not None else 0
    cache = Cache(attention_mask=None if mask is None else mask[:, window:])
    ordered = sorted(plans.items(), key=lambda kv: (catalog.order(kv[1].family.name), kv[1].layer or 0))
    callbacks = [(plan, _callback(key, plan, sources, cache, grad, window, mask)) for key, plan in ordered]
    handles: list[Handle] = []  # the run's undo list: every change, registered before it is made
    mark, previous = hook_mark(), collector()
    try:
        raw, output, prefix = _installed_forward(
            model, adapter, run_inputs, callbacks, handles, previous, grad, keep_prefix, resume, output_at,
            set(plans) - set(output_only),
        )
    except BaseException:
        _teardown(handles, previous, model, mark)
        raise
    missed = [key for key, plan in plans.items() if plan.fired == 0]
    if missed:
        raise SiteError(
            f"sites {', '.join(missed)} were never reached during the forward pass; "
            f"the adapter {adapter.name!r} reaches them through modules this call did not run"
        )
    return Run(output, cache, raw, prefix)


def _installed_forward(
    model: nn.Module, adapter: Adapter, inputs: Inputs, callbacks: list, handles: list[Handle],
    previous: list[Handle] | None, grad: bool, keep_prefix: bool, resume: Resume | None,
    output_at: torch.Tensor | None, whole: set[str],
) -> tuple[Any, torch.Tensor, Prefix | None]:
    """Install every hook, run the forward and remove the hooks (on success: the caller tears down when
    this raises, also at its last line). Every change a reach or the adapter makes through
    :class:`~crosspatch.engine.reach.Changes` during the run joins ``handles`` before it is made."""
    collect(handles)
    # Until an install returns, the run holds every undo it registered (an interrupt loses none); then what
    # it returned takes their place in the same step, with no line between: the run removes what install
    # returned, as any caller of install does, so a reach that returns fewer handles than it installed
    # leaks them and the conformance suite says so.
    for plan, callback in callbacks:
        start = len(handles)
        handles[start:] = plan.family.reach.install(plan.layer, callback)
    if output_at is not None:
        start = len(handles)
        handles[start:] = adapter.output_at(model, output_at, whole)
    if grad:
        start = len(handles)
        handles[start:] = adapter.gradient_hooks(model)
    prefix = None
    with _grad_mode(grad):
        if resume is not None:
            raw = adapter.resume(model, inputs, resume)
        elif keep_prefix:
            raw, prefix = adapter.forward_keeping_prefix(model, inputs)
        else:
            raw = adapter.forward(model, inputs)
        output = adapter.output(raw)
    _teardown(handles, previous)
    return raw, output, prefix


def _teardown(handles: list[Handle], previous: list[Handle] | None, model: nn.Module | None = None, mark: int = 0) -> None:
    """Stop collecting, remove the run's handles; after a failed run (``model`` given), also every hook
    registered on the model's modules since ``mark`` that no handle covered (a reach that installs a
    hook before it registers its undo), with a warning."""
    collect(previous)
    remove_all(handles)
    if model is None or not isinstance(model, nn.Module):
        return
    left = remove_hooks_since(model, mark)
    if left:
        log.warning(
            "a failed run left %d hook(s) on %s's modules that no reach handle covered; removed them",
            left, type(model).__name__,
        )


def _attention_mask(inputs: Inputs, n_rows: int) -> torch.Tensor | None:
    """The inputs' ``attention_mask`` (``[rows, columns]``), which says which positions are padding."""
    mask = inputs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.ndim == 2 and mask.shape[0] == n_rows:
        return mask
    return None


def _joining(resume: Resume, catalog: Catalog, plan_for, inputs: Inputs, n_rows: int) -> Inputs:
    """Set each join's rows on its site's plan; return the inputs of the rows the adapter starts with."""
    start = resume.prefix.rows
    if n_rows != start + resume.joined:
        raise ValueError(
            f"a run with rows joining part-way has {start} starting rows and {resume.joined} joining: "
            f"{start + resume.joined} rows of inputs, got {n_rows}"
        )
    for key, copies in resume.joins:
        site = catalog.resolve(key)
        if site.selection or _before_resume(site, resume, catalog) or catalog.family(site.family).axis_names[:1] != ("pos",):
            raise SiteError(f"rows join at {key}: a whole residual of a block the run computes, laid out [rows, pos, ...]")
        plan = plan_for(site)
        value = resume.prefix.residuals[site.layer][:, resume.pos :]
        plan.join = value.repeat(copies, *([1] * (value.ndim - 1)))
    return {k: v[:start] if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == n_rows else v for k, v in inputs.items()}


def _resumable(site: Site, intervention: Intervention, resume: Resume, catalog: Catalog) -> Site:
    """``site`` as the resumed run sees it, or an error saying why the run cannot reach it."""
    if _before_resume(site, resume, catalog):
        raise SiteError(
            f"site {site} is computed before block {resume.layer}, where this run resumes; "
            f"resume at layer <= {site.layer} or run the whole model"
        )
    if resume.pos and not intervention.position_local:
        raise SiteError(
            f"{type(intervention).__name__} at {site} reads other positions of the activation, so it cannot "
            f"run from position {resume.pos}; resume at pos=0"
        )
    if site.selection.get("pos") == LAST:
        return site  # each row's own column: shifted, and checked to be computed, when the run applies it
    return windowed(site, resume.pos, resume.prefix.length)  # refuses a site that covers earlier positions


def _capturable(site: Site, resume: Resume, catalog: Catalog) -> None:
    """Refuse a capture the resumed run does not compute (whole)."""
    if _before_resume(site, resume, catalog):
        raise SiteError(f"capture {site}: computed before block {resume.layer}, where this run resumes")
    if resume.pos and "pos" not in catalog.family(site.family).axis_names:
        raise SiteError(
            f"capture {site}: the run computes positions {resume.pos}.. only and the family has no 'pos' axis "
            f"to hold them on; resume at pos=0"
        )


def _before_resume(site: Site, resume: Resume, catalog: Catalog) -> bool:
    """Whether ``site`` is computed before the block the run resumes at. A family without layers after
    the blocks (the final norm's input, the logits) is computed by every resumed run, and a run on its
    own inputs computes everything (from its first position)."""
    if resume.own_inputs or (site.layer is None and _after_blocks(catalog, site.family)):
        return False
    return not isinstance(site.layer, int) or site.layer < resume.layer


def _after_blocks(catalog: Catalog, family: str) -> bool:
    """True for a family without layers that the catalog (in forward order) lists after a family with layers."""
    order = catalog.order(family)
    return any(f.layers is not None and catalog.order(f.name) < order for f in catalog)


def _check_rows(site: Site, rows: slice | None, n_rows: int) -> slice | None:
    """Rows as a plain ``start:stop`` inside the batch; anything else is refused, not clipped."""
    if rows is None:
        return None
    start, stop, step = rows.indices(n_rows)
    inside = all(v is None or -n_rows <= v <= n_rows for v in (rows.start, rows.stop))
    if step != 1 or stop <= start or not inside:
        raise ValueError(
            f"intervention at {site}: rows {rows} fall outside the batch of {n_rows} rows or are not a "
            f"contiguous, non-empty block of it"
        )
    return slice(start, stop)


def _callback(
    key: str, plan: _Plan, sources: dict[int, Cache], cache: Cache, grad: bool, window: int = 0,
    mask: torch.Tensor | None = None,
):
    fam = plan.family
    pos_axis = 1 + fam.axis_names.index("pos") if window else 0

    def source_mask(bound: Bound, last: bool) -> torch.Tensor | None:
        """The source's attention mask over the run's window (none for per-row last tokens: all real)."""
        held = sources.get(id(bound.intervention))
        if last or held is None or held.attention_mask is None or "pos" not in fam.axis_names:
            return None
        return held.attention_mask[:, window:] if window else held.attention_mask

    def source_of(bound: Bound, last: bool) -> torch.Tensor | None:
        """The source activation in the run's window; with ``last``, its own rows' last real tokens."""
        held = sources.get(id(bound.intervention))
        source = _source_tensor(held, key, grad)
        if window and source is not None:  # the run holds positions window.. only
            source = source.narrow(pos_axis, window, source.shape[pos_axis] - window)
        if source is None or not last:
            return source
        target_rows = rows_mask(bound)
        if held.attention_mask is None and target_rows is not None and bool((target_rows[:, -1] == 0).any()):
            raise SiteError(
                f"{type(bound.intervention).__name__} at {bound.site}: 'last' reads each source row's last real token, "
                f"but the source cache keeps no attention mask while the rows it patches are padded on the right; "
                f"capture the source with run or capture (they keep it) or give Cache(..., attention_mask=...)"
            )
        return take_rows(source, last_columns(bound.site, fam.axis_names, source, held.attention_mask, window))

    def apply(bound: Bound, target: torch.Tensor, index: tuple, x: torch.Tensor, last: bool = False) -> torch.Tensor:
        source = source_of(bound, last)
        new = bound.intervention.apply(x, ApplyContext(bound.site, fam, index, target, source, source_mask(bound, last)))
        if new.shape != x.shape:
            raise SiteError(
                f"{type(bound.intervention).__name__} at {bound.site} returned shape {tuple(new.shape)}, "
                f"expected {tuple(x.shape)}"
            )
        return new.to(dtype=target.dtype, device=target.device)

    def rows_mask(bound: Bound) -> torch.Tensor | None:
        return mask if mask is None or bound.rows is None else mask[bound.rows]

    def on_value(value: torch.Tensor) -> torch.Tensor | None:
        plan.fired += 1
        if plan.join is not None:
            if plan.join.shape[1:] != value.shape[1:]:
                raise SiteError(f"rows joining at {key} hold {tuple(plan.join.shape[1:])} per row, the run {tuple(value.shape[1:])}")
            value = torch.cat([value, plan.join.to(device=value.device, dtype=value.dtype)])
        out = value
        for bound, written in zip(plan.bounds, plan.written):
            check_padding(written, fam.axis_names, value.shape[1:], rows_mask(bound), window)
        # A gradient run with one intervention on all of the value (the taps of attribution methods):
        # its result is the new value as it is, when it is a fresh tensor in the graph. No copy of a value
        # that may be many times the residual's size, and no backward through one.
        whole = grad and len(plan.bounds) == 1 and plan.bounds[0].rows is None and not last_axes(plan.bounds[0].site)
        if whole:
            index = axis_index(plan.bounds[0].site, fam, value.shape[1:], value.device)
            whole = all(isinstance(part, slice) and part == slice(None) for part in index)
        if whole:
            # A view is its own node in the graph: gradients with respect to it flow only through the
            # intervention's result, as they would through the copy the general path makes.
            x = value.view_as(value)
            out = apply(plan.bounds[0], value, index, x)
            if (out._base is not None and not aliases(out, value)) or not out.requires_grad:
                out = value.clone().copy_(out)  # a view of a source, or cut from the graph: write a copy
        elif plan.bounds:
            out = value.clone()
            for bound in plan.bounds:
                target = out if bound.rows is None else out[bound.rows]
                picks = last_columns(bound.site, fam.axis_names, target, rows_mask(bound), window)
                if picks:  # each row's own column: a copy with those axes cut to it, written back below
                    whole_target, target = target, take_rows(target, picks)
                index = axis_index(at_first(bound.site) if picks else bound.site, fam, target.shape[1:], target.device)
                x = select(target, index)
                if grad:  # the slot is overwritten below; an intervention may keep x for its backward pass
                    x = x.clone()
                target[(slice(None), *index)] = apply(bound, target, index, x, bool(picks))
                if picks:
                    put_rows(whole_target, picks, target)
        if plan.capture:
            cache._store(key, out if grad else out.detach(), fam.axis_names)
        return out if plan.bounds or plan.join is not None else None

    return on_value


def _source_tensor(source: Cache | None, key: str, grad: bool) -> torch.Tensor | None:
    if source is None or key not in source:
        return None
    tensor = source[key]
    if grad and tensor.is_inference():
        tensor = tensor.clone()  # inference tensors cannot take part in autograd
    return tensor


def _resolve_sources(model, adapter, catalog, bounds: list[Bound], grad: bool) -> dict[int, Cache]:
    """Per intervention, the Cache its source activations come from (running source inputs once)."""
    by_input: dict[int, tuple[Any, set[str], list[Intervention]]] = {}
    resolved: dict[int, Cache] = {}
    for bound in bounds:
        src = bound.intervention.source_inputs
        if src is None:
            continue
        if isinstance(src, Cache):
            if bound.site.key not in src:
                raise SiteError(
                    f"{type(bound.intervention).__name__} at {bound.site}: its source cache has no {bound.site.key!r} "
                    f"(it holds {', '.join(src) or 'nothing'}); capture that site in the source run"
                )
            resolved[id(bound.intervention)] = src
            continue
        entry = by_input.setdefault(id(src), (src, set(), []))
        entry[1].add(bound.site.key)
        entry[2].append(bound.intervention)
    for src, keys, users in by_input.values():
        prepared = adapter.prepare(model, src)
        cache = execute(model, adapter, catalog, prepared, capture=sorted(keys)).cache
        for intervention in users:
            resolved[id(intervention)] = cache
    return resolved
