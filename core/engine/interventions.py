"""Interventions: small objects that turn an activation (and maybe a source's) into a new one.

Each receives the selected part of the activation, ``x`` of shape ``[rows, *selected axes]``, and
an :class:`ApplyContext` that carries the site, the full target activation and, for interventions
that read other inputs (:class:`Patch`, :class:`Mean`, :class:`Resample`), the source activation.
Parameters that live in activation space (``Add.vector``, ``ProjectOut.basis``) are given in the
family's layout without the batch axis and are broadcast, then selected like the activation.

Every intervention serialises to a plain dict (``to_dict``) and back (:func:`from_dict`), except
:class:`Fn`, a plain Python function, which refuses to.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping

import torch

from .cache import Cache
from ..sites.catalog import SiteFamily
from ..sites.selection import select
from ..sites.site import Site, SiteError

__all__ = [
    "ApplyContext", "Intervention", "Patch", "Zero", "Mean", "Resample", "Noise", "Add", "Scale",
    "ProjectOut", "KnockoutEdges", "Fn", "from_dict", "BUILTIN_INTERVENTIONS",
]


@dataclass
class ApplyContext:
    """What an intervention may read besides the selected activation."""

    site: Site
    family: SiteFamily
    index: tuple
    target: torch.Tensor
    source: torch.Tensor | None = None
    # The source run's attention mask over the source's positions ([rows, pos]; 1 real, 0 padding),
    # when the source inputs carried one and the family has a position axis.
    source_mask: torch.Tensor | None = None

    def select(self, tensor: torch.Tensor) -> torch.Tensor:
        """Select this site's axes from a batched tensor laid out like the target."""
        return select(tensor, self.index)

    def param(self, tensor: torch.Tensor, name: str) -> torch.Tensor:
        """Broadcast a parameter given in the family's layout (no batch axis) and select it."""
        axes_shape = self.target.shape[1:]
        tensor = tensor.to(device=self.target.device, dtype=self.target.dtype)
        try:
            full = tensor.expand(axes_shape)
        except RuntimeError:
            raise SiteError(
                f"{name} has shape {tuple(tensor.shape)}, which does not broadcast to the activation of "
                f"{self.site} with axes ({', '.join(self.family.axis_names)}) = {tuple(axes_shape)}"
            ) from None
        return select(full, self.index, batched=False).unsqueeze(0)

    def require_source(self, kind: str) -> torch.Tensor:
        """The source activation on the target's device and in its dtype (a source cache may live on
        another device, e.g. captured on one GPU of a device map or moved to the CPU, or in another dtype)."""
        if self.source is None:
            raise SiteError(f"{kind} at {self.site}: no source activation was captured for {self.site.key}")
        if self.source.shape[1:] != self.target.shape[1:]:
            raise SiteError(
                f"{kind} at {self.site}: the source activation has shape {tuple(self.source.shape)} but the "
                f"target has {tuple(self.target.shape)}; source and target inputs must have the same length"
            )
        return self.source.to(device=self.target.device, dtype=self.target.dtype)


class Intervention:
    """Base class. Subclasses are dataclasses with a unique ``kind``."""

    kind: ClassVar[str] = ""
    # True when the result at each position depends only on that position (and the source's):
    # such an intervention may run in a forward that skips the positions before it (crosspatch.resume).
    position_local: ClassVar[bool] = False

    def apply(self, x: torch.Tensor, ctx: ApplyContext) -> torch.Tensor:
        raise NotImplementedError

    @property
    def source_inputs(self) -> Any:
        """Inputs (or a Cache) this intervention reads activations from, if any."""
        return None

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"kind": self.kind}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            out[f.name] = {"cache": value.to_dict()} if isinstance(value, Cache) else value
        return out

    @classmethod
    def _from_fields(cls, data: Mapping) -> "Intervention":
        kwargs = {}
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            if f.name in data:
                value = data[f.name]
                if isinstance(value, Mapping) and set(value) == {"cache"}:
                    value = Cache.from_dict(value["cache"])
                kwargs[f.name] = value
        return cls(**kwargs)


def _wide(t: torch.Tensor) -> torch.Tensor:
    """Half-precision tensors are reduced in float32; float32 and float64 stay as they are."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _as_rows(kind: str, site: Site, src: torch.Tensor, rows: int) -> torch.Tensor:
    if src.shape[0] == rows:
        return src
    if src.shape[0] == 1:
        return src.expand(rows, *src.shape[1:])
    raise SiteError(
        f"{kind} at {site}: the source has {src.shape[0]} rows but the target has {rows}; "
        f"give a source with {rows} rows (one per target row) or 1 (shared)"
    )


@dataclass
class Patch(Intervention):
    """Interchange: replace the activation with a source run's (a Cache, or inputs to run)."""

    kind: ClassVar[str] = "patch"
    position_local: ClassVar[bool] = True
    source: Any = None

    @property
    def source_inputs(self) -> Any:
        return self.source

    def apply(self, x, ctx):
        src = ctx.select(ctx.require_source("Patch"))
        return _as_rows("Patch", ctx.site, src, x.shape[0])


@dataclass
class Zero(Intervention):
    """Zero ablation."""

    kind: ClassVar[str] = "zero"
    position_local: ClassVar[bool] = True

    def apply(self, x, ctx):
        return torch.zeros_like(x)


@dataclass
class Mean(Intervention):
    """Mean ablation: the reference set's mean activation over ``over`` (``batch`` and/or axes).

    When the reference inputs carry an ``attention_mask``, padded positions do not count: each position
    is averaged over the rows where it is a real token (a position padded in every row keeps the plain
    mean), and over real positions only when ``pos`` is averaged too.
    """

    kind: ClassVar[str] = "mean"
    reference: Any = None
    over: tuple[str, ...] = ("batch",)

    @property
    def source_inputs(self) -> Any:
        return self.reference

    @property
    def position_local(self) -> bool:  # type: ignore[override]
        return "pos" not in self.over

    def apply(self, x, ctx):
        ref = ctx.require_source("Mean")
        names = ("batch",) + ctx.family.axis_names
        unknown = set(self.over) - set(names)
        if unknown:
            raise SiteError(f"Mean at {ctx.site}: cannot average over {sorted(unknown)}; axes are {names}")
        if "batch" not in self.over:
            raise SiteError(f"Mean at {ctx.site}: over={tuple(self.over)} must include 'batch' (the reference set)")
        dims = [names.index(n) for n in self.over]
        mean = _masked_mean(_wide(ref), dims, _position_weights(ref, names, ctx.source_mask))
        return ctx.select(mean.to(ref.dtype).expand(1, *ref.shape[1:])).expand_as(x)


def _position_weights(ref: torch.Tensor, names: tuple[str, ...], mask: torch.Tensor | None) -> torch.Tensor | None:
    """The source's padding mask laid along ``ref``'s batch and position axes (None: every entry counts)."""
    if mask is None or "pos" not in names:
        return None
    pos = names.index("pos")
    if tuple(mask.shape) != (ref.shape[0], ref.shape[pos]):
        return None
    shape = [1] * ref.ndim
    shape[0], shape[pos] = ref.shape[0], ref.shape[pos]
    return mask.to(ref.device).reshape(shape)


def _masked_mean(wide: torch.Tensor, dims: list[int], weights: torch.Tensor | None) -> torch.Tensor:
    """Mean over ``dims`` counting only real (unpadded) entries; where none is real, the plain mean."""
    plain = wide.mean(dim=dims, keepdim=True)
    if weights is None:
        return plain
    weights = weights.to(wide.dtype)
    count = (weights.expand_as(wide)).sum(dim=dims, keepdim=True)
    real = (wide * weights).sum(dim=dims, keepdim=True) / count.clamp_min(1)
    return torch.where(count > 0, real, plain)


@dataclass
class Resample(Intervention):
    """Resample ablation: each target row takes the activation of a random source row (seeded)."""

    kind: ClassVar[str] = "resample"
    position_local: ClassVar[bool] = True
    source: Any = None
    seed: int = 0

    @property
    def source_inputs(self) -> Any:
        return self.source

    def apply(self, x, ctx):
        src = ctx.select(ctx.require_source("Resample"))
        gen = torch.Generator(device=src.device).manual_seed(self.seed)
        rows = torch.randint(src.shape[0], (x.shape[0],), generator=gen, device=src.device)
        return src[rows]


@dataclass
class Noise(Intervention):
    """Gaussian noise, ``scale`` times ``std`` (by default the activation's own std), as in causal tracing."""

    kind: ClassVar[str] = "noise"
    scale: float = 3.0
    std: float | None = None
    seed: int = 0

    def apply(self, x, ctx):
        std = self.std if self.std is not None else _wide(ctx.target).std()
        gen = torch.Generator(device=x.device).manual_seed(self.seed)
        wide = _wide(x)
        noise = torch.randn(x.shape, generator=gen, device=x.device, dtype=wide.dtype)
        return (wide + noise * (self.scale * std)).to(x.dtype)


@dataclass
class Add(Intervention):
    """Steering: add ``alpha * vector`` (broadcast over the family's axes)."""

    kind: ClassVar[str] = "add"
    position_local: ClassVar[bool] = True
    vector: torch.Tensor = None  # type: ignore[assignment]
    alpha: float = 1.0

    def apply(self, x, ctx):
        return x + self.alpha * ctx.param(torch.as_tensor(self.vector), "Add.vector")


@dataclass
class Set(Intervention):
    """do(x = value): replace the activation with ``value`` (broadcast over the family's axes, like
    ``Add.vector``; a scalar sets every selected element). ``Add`` is the shift, ``Patch`` the interchange."""

    kind: ClassVar[str] = "set"
    position_local: ClassVar[bool] = True
    value: Any = None

    def apply(self, x, ctx):
        if self.value is None:
            raise SiteError(f"Set at {ctx.site}: no value given; write Set(value)")
        return ctx.param(torch.as_tensor(self.value), "Set.value").expand_as(x)


@dataclass
class Scale(Intervention):
    """Multiply the activation by ``factor``."""

    kind: ClassVar[str] = "scale"
    position_local: ClassVar[bool] = True
    factor: float = 0.0

    def apply(self, x, ctx):
        return x * self.factor


@dataclass
class ProjectOut(Intervention):
    """Erasure: remove the span of ``basis`` (``[k, d]`` or ``[d]``) along the last axis."""

    kind: ClassVar[str] = "project_out"
    position_local: ClassVar[bool] = True
    basis: torch.Tensor = None  # type: ignore[assignment]

    def apply(self, x, ctx):
        last = ctx.family.axis_names[-1]
        if ctx.index[-1] != slice(None):
            raise SiteError(f"ProjectOut at {ctx.site}: it acts on the whole {last!r} axis; do not select it")
        basis = torch.as_tensor(self.basis)
        basis = basis.unsqueeze(0) if basis.ndim == 1 else basis
        if basis.ndim != 2 or basis.shape[1] != x.shape[-1]:
            raise SiteError(
                f"ProjectOut at {ctx.site}: basis has shape {tuple(basis.shape)}; expected [k, {x.shape[-1]}] "
                f"(k directions along {last!r})"
            )
        # An orthonormal basis of the span, also when the given directions are dependent.
        # Computed where the basis lives (the rank cut reads values), then moved to the activation's device.
        u, s, _ = torch.linalg.svd(basis.to(dtype=torch.float64).T, full_matrices=False)
        q = u[:, s > s.max() * 1e-10].to(device=x.device, dtype=x.dtype)
        return x - (x @ q) @ q.T


@dataclass
class Fn(Intervention):
    """A plain function as an intervention: ``fn(x)`` returns the new activation, shaped like ``x``.

    ``x`` is what every intervention receives: the selected activation, ``[rows, *selected axes]``,
    for the rows the intervention is bound to. With ``needs_source`` (inputs to run, or a Cache, as
    :class:`Patch` takes) the function is called ``fn(x, source)`` with the source activation selected
    the same way, one row per target row. A function with a parameter named ``ctx`` also gets the
    :class:`ApplyContext` (site, full target). Gradients flow through it in a ``grad=True`` run.
    ``m.run(x, {"resid_post.0": lambda a: a * 0})`` wraps a bare function in ``Fn`` itself.
    A function does not serialise: :meth:`to_dict` raises, naming it.
    """

    kind: ClassVar[str] = "fn"
    fn: Callable[..., torch.Tensor] = None  # type: ignore[assignment]
    needs_source: Any = None

    def __post_init__(self):
        if not callable(self.fn):
            raise TypeError(f"Fn wraps a function (x) -> new x, got {type(self.fn).__name__}")
        try:
            self._wants_ctx = "ctx" in inspect.signature(self.fn).parameters
        except (TypeError, ValueError):  # a builtin without a signature
            self._wants_ctx = False

    @property
    def source_inputs(self) -> Any:
        return self.needs_source

    @property
    def name(self) -> str:
        """The function's name and, when known, where it is defined (``<lambda> at study.py:12``)."""
        fn = self.fn
        name = getattr(fn, "__qualname__", None) or type(fn).__name__
        code = getattr(fn, "__code__", None)
        return f"{name} at {code.co_filename.rsplit('/', 1)[-1]}:{code.co_firstlineno}" if code else name

    def apply(self, x, ctx):
        args: list[Any] = [x]
        if self.needs_source is not None:
            args.append(_as_rows(f"Fn({self.name})", ctx.site, ctx.select(ctx.require_source("Fn")), x.shape[0]))
        new = self.fn(*args, ctx=ctx) if self._wants_ctx else self.fn(*args)
        if not isinstance(new, torch.Tensor):
            raise TypeError(
                f"Fn({self.name}) at {ctx.site} returned {type(new).__name__}; it must return a tensor shaped like "
                f"its input {tuple(x.shape)}"
            )
        return new

    def to_dict(self) -> dict:
        raise TypeError(
            f"Fn({self.name}) wraps a Python function, which does not serialise; to save an intervention use a "
            f"built-in one (Zero, Scale, Add, Set, ...) or a registered Intervention subclass"
        )

    def __repr__(self) -> str:
        source = ", needs_source=..." if self.needs_source is not None else ""
        return f"Fn({self.name}{source})"


@dataclass
class KnockoutEdges(Intervention):
    """The knockout of one attention pattern site: queries in ``dst`` do not attend to keys in ``src``.

    The site's family is a pattern whose last three axes are ``head``, a query axis and its key axis
    (``pos`` / ``key_pos`` in a language model, ``patch`` / ``key_patch`` in Qwen2-VL's tower: the key axis is
    ``key_`` + the query axis), optionally after an axis ``image`` (a tower served with several images a row:
    one pattern per image). ``dst`` masks the query axis and ``src`` the key axis: ``[n]`` for every row,
    ``[rows, n]`` per row (``rows`` the rows the site is bound to, or a divisor of them when the inputs are
    tiled) and, with an ``image`` axis, these for every image alike or ``[rows, image, n]`` per image (rows
    again 1 or a divisor). The site selects heads at most; positions and images are the masks'.

    Queries with blocked edges keep the share of their unblocked keys, renormalised (the softmax over the
    unblocked scores); a query left with no key that had attention is an error (the softmax over nothing is
    undefined). Queries none of whose attention was blocked are returned bit for bit, so edges that carry
    no attention (masked by the model: causal, a window, padding) change nothing.
    """

    kind: ClassVar[str] = "knockout"
    src: torch.Tensor = None  # type: ignore[assignment]
    dst: torch.Tensor = None  # type: ignore[assignment]

    @staticmethod
    def pattern_axes(family: SiteFamily) -> tuple[str | None, str, str]:
        """``(image axis or None, query axis, key axis)`` of an attention pattern family; a
        :class:`SiteError` naming the axes when ``family`` is not laid out as one."""
        names = family.axis_names
        lead, tail = names[:-3], names[-3:]
        if len(tail) == 3 and tail[0] == "head" and tail[2] == f"key_{tail[1]}" and lead in ((), ("image",)):
            return (lead[0] if lead else None), tail[1], tail[2]
        raise SiteError(
            f"Knockout: family {family.name!r} has axes ({', '.join(names)}); a knockout writes an attention pattern "
            f"(head, <query>, key_<query>), e.g. (head, pos, key_pos) or (head, patch, key_patch), optionally after "
            f"an 'image' axis"
        )

    def apply(self, x: torch.Tensor, ctx: ApplyContext) -> torch.Tensor:
        image, query, key = self.pattern_axes(ctx.family)
        extra = sorted(set(ctx.site.selection) - {"head"})
        if extra:
            raise SiteError(
                f"Knockout at {ctx.site}: expected an attention pattern selected by head at most (the {query} and "
                f"{key} positions{' and the images' if image else ''} are the knockout's masks), got {extra} selected"
            )
        rows, queries, keys = x.shape[0], x.shape[-2], x.shape[-1]
        images = x.shape[1] if image else None
        src = _mask_rows(self.src, rows, images, keys, "src", key, ctx.site)
        dst = _mask_rows(self.dst, rows, images, queries, "dst", query, ctx.site)
        blocked = (dst[..., None, :, None] & src[..., None, None, :]).to(x.device)  # [rows, (image,) 1, query, key]
        kept = x.masked_fill(blocked, 0)
        lost = (x - kept).sum(dim=-1, keepdim=True)
        total = kept.sum(dim=-1, keepdim=True)
        touched = lost > 0
        empty = touched & (total <= 0)
        if bool(empty.any()):
            where = empty.nonzero()[0].tolist()
            at = f"row {where[0]}" + (f", image {where[1]}" if image else "")
            raise SiteError(
                f"Knockout at {ctx.site}: query {query} {where[-2]} of {at} (head {where[-3]} of the selection) has "
                f"all its attention blocked; keep at least one key it attends to (its own position, say)"
            )
        return torch.where(touched, kept / total.clamp_min(torch.finfo(x.dtype).tiny), x)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "src": self.src.bool().tolist(), "dst": self.dst.bool().tolist()}

    @classmethod
    def _from_fields(cls, data: Mapping) -> "KnockoutEdges":
        return cls(torch.tensor(data["src"], dtype=torch.bool), torch.tensor(data["dst"], dtype=torch.bool))


def _mask_rows(mask: torch.Tensor, rows: int, images: int | None, size: int, what: str, axis: str, site: Site
               ) -> torch.Tensor:
    """A knockout mask over the pattern's ``axis`` as ``[rows, size]``, or ``[rows, images, size]`` for a pattern
    with an image axis."""
    mask = mask.bool()
    if mask.ndim == 1:
        mask = mask.unsqueeze(0)
    shapes = f"[{size}] or [rows, {size}]" + (f", or [rows, {images}, {size}] per image" if images else "")
    if mask.ndim not in ((2, 3) if images else (2,)):
        raise SiteError(
            f"Knockout at {site}: the {what} mask has shape {tuple(mask.shape)}; "
            + ("" if images or mask.ndim != 3 else "the pattern has no image axis; ") + f"give {shapes}"
        )
    if mask.shape[-1] != size:
        raise SiteError(
            f"Knockout at {site}: the {what} mask covers {mask.shape[-1]} positions, but the pattern's axis "
            f"{axis!r} has {size}; give {shapes}"
        )
    if mask.ndim == 3 and mask.shape[1] != images:
        raise SiteError(
            f"Knockout at {site}: the {what} mask covers {mask.shape[1]} images, the pattern {images} a row; "
            f"give {shapes}"
        )
    if images and mask.ndim == 2:
        mask = mask.unsqueeze(1).expand(-1, images, -1)
    if mask.shape[0] == rows:
        return mask
    if mask.shape[0] == 1 or rows % mask.shape[0] == 0:  # shared, or inputs tiled in blocks (all rows, again ...)
        return mask.repeat(rows // mask.shape[0], *([1] * (mask.ndim - 1)))
    raise SiteError(f"Knockout at {site}: the {what} mask has {mask.shape[0]} rows, the batch {rows}")


BUILTIN_INTERVENTIONS: dict[str, type[Intervention]] = {
    cls.kind: cls for cls in (Patch, Zero, Mean, Resample, Noise, Add, Set, Scale, ProjectOut)
}


def from_dict(data: Mapping) -> Intervention:
    """Rebuild an intervention from :meth:`Intervention.to_dict`, built-in or registered by a plugin."""
    from ..plugins.registry import get_registry

    kind = data.get("kind")
    known = {**get_registry().interventions(), **BUILTIN_INTERVENTIONS, KnockoutEdges.kind: KnockoutEdges}
    cls = known.get(kind)  # type: ignore[arg-type]
    if cls is None:
        raise ValueError(f"unknown intervention kind {kind!r}; known kinds: {', '.join(sorted(known))}")
    return cls._from_fields({k: v for k, v in data.items() if k != "kind"})
