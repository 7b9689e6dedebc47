"""Concept erasure: LEACE and mean projection, fitted at a site and applied as an intervention.

LEACE (Belrose et al. 2023, "LEACE: Perfect linear concept erasure in closed form", Thm. 4.3) is the
affine map ``r(x) = x - W⁺ P W (x - E[x])`` where ``W = (Σ_xx^{1/2})⁺`` whitens the activations and
``P`` is the orthogonal projection onto the column space of ``W Σ_xz``. Among all affine maps after
which no linear classifier can predict the concept better than a constant (``Cov(r(x), z) = 0``,
linear guardedness), it moves the activations least in mean squared distance.
``method="mean"`` is the orthogonal variant (``W = I``): project out the span of the class-mean
differences, through the mean.

We compute the closed form ourselves (about twenty lines, float64, no dependency) rather than
wrapping EleutherAI's ``concept-erasure``: that package defaults to covariance shrinkage and a
trace constraint that change the eraser from the paper's closed form, and crosspatch needs the
map as an intervention that acts on any site's feature axis anyway. The tests check the closed
form's two properties (zero cross-covariance; least squares among guarded maps).

    eraser = fit_eraser(m, prompts, "resid_post.1[pos=3]", labels)   # an Erase intervention
    out = m.run(other_prompts, {"resid_post.1[pos=3]": eraser})
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from ..engine.interventions import ApplyContext, Intervention
from ..engine.model import WrappedModel, wrap
from ..sites.site import Site, SiteError

__all__ = [
    "ConceptEraser", "fit_leace", "fit_mean_projection", "Erase", "fit_eraser", "site_activations",
    "feature_axis", "probe_accuracy",
]

logger = logging.getLogger(__name__)

Method = Literal["leace", "mean"]


@dataclass
class ConceptEraser:
    """The affine eraser ``x - ((x - bias) @ proj_right.T) @ proj_left.T`` on the last axis.

    ``P = I - proj_left @ proj_right`` is a rank-``r`` change of the identity (``r`` = the rank
    of the cross-covariance, ``k - 1`` for ``k`` classes), stored as its two thin factors.
    """

    proj_left: torch.Tensor  # [d, r]
    proj_right: torch.Tensor  # [r, d]
    bias: torch.Tensor | None  # [d] the mean of the fitted activations (affine eraser) or None

    @property
    def P(self) -> torch.Tensor:
        eye = torch.eye(self.proj_left.shape[0], dtype=self.proj_left.dtype, device=self.proj_left.device)
        return eye - self.proj_left @ self.proj_right

    @property
    def rank(self) -> int:
        return int(self.proj_left.shape[1])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        left = self.proj_left.to(device=x.device, dtype=_wide_dtype(x))
        right = self.proj_right.to(device=x.device, dtype=left.dtype)
        wide = x.to(left.dtype)
        delta = wide if self.bias is None else wide - self.bias.to(device=x.device, dtype=left.dtype)
        return (wide - (delta @ right.T) @ left.T).to(x.dtype)


def _wide_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def _labels_matrix(z: torch.Tensor, n: int) -> torch.Tensor:
    """Integer class labels -> one-hot; float labels [n] or [n, k] as they are."""
    z = torch.as_tensor(z)
    if z.shape[0] != n:
        raise ValueError(f"{z.shape[0]} labels for {n} activations; give one label per activation row")
    if not z.is_floating_point():
        classes, index = torch.unique(z, return_inverse=True)
        if len(classes) < 2:
            raise ValueError(f"the labels hold one class ({classes.tolist()}); a concept needs at least two")
        return nn.functional.one_hot(index.reshape(n), len(classes)).double()
    return z.reshape(n, -1).double()


def fit_leace(
    x: torch.Tensor,
    z: torch.Tensor,
    *,
    method: Method = "leace",
    affine: bool = True,
    tol: float = 1e-8,
) -> ConceptEraser:
    """Fit the closed-form LEACE eraser (or ``method="mean"``: orthogonal mean projection).

    ``x`` is ``[n, d]``; ``z`` is ``[n]`` integer classes (one-hot encoded) or ``[n, k]`` floats.
    Directions whose singular value is below ``tol`` times the largest are dropped. Statistics are
    computed in float64; the eraser is float64 and casts on use.
    """
    if x.ndim != 2:
        raise ValueError(f"x must be [n, d], got shape {tuple(x.shape)}")
    n, d = x.shape
    if n < 2:
        raise ValueError("fitting an eraser needs at least two activations")
    x64 = x.detach().double()
    zz = _labels_matrix(z, n).to(x64.device)
    mean_x = x64.mean(0)
    xc = x64 - mean_x
    zc = zz - zz.mean(0)
    sigma_xz = xc.T @ zc / (n - 1)  # [d, k]
    if method == "leace":
        sigma_xx = xc.T @ xc / (n - 1)
        sigma_xx = (sigma_xx + sigma_xx.T) / 2
        eigval, eigvec = torch.linalg.eigh(sigma_xx)
        keep = eigval > eigval[-1].clamp_min(0) * d * torch.finfo(eigval.dtype).eps  # the cut torch.linalg.pinv uses
        eigval = eigval.clamp_min(0)
        whiten = (eigvec * torch.where(keep, eigval.rsqrt(), 0.0)) @ eigvec.T  # W = (Σ^{1/2})⁺
        unwhiten = (eigvec * torch.where(keep, eigval.sqrt(), 0.0)) @ eigvec.T  # W⁺ = Σ^{1/2}
    elif method == "mean":
        whiten = unwhiten = torch.eye(d, dtype=torch.float64, device=x64.device)
    else:
        raise ValueError(f"method must be 'leace' or 'mean', got {method!r}")
    u, s, _ = torch.linalg.svd(whiten @ sigma_xz, full_matrices=False)
    u = u[:, s > s.max() * tol] if s.numel() and s.max() > 0 else u[:, :0]
    if u.shape[1] == 0:
        logger.warning("the activations carry no linear information about the labels; the eraser is the identity")
    return ConceptEraser(unwhiten @ u, u.T @ whiten, mean_x if affine else None)


def fit_mean_projection(x: torch.Tensor, z: torch.Tensor, *, affine: bool = True, tol: float = 1e-8) -> ConceptEraser:
    """Project out the span of the class-mean differences (orthogonally, through the mean)."""
    return fit_leace(x, z, method="mean", affine=affine, tol=tol)


def feature_axis(family_axes: tuple[str, ...], axis: str | None = None) -> str:
    """The axis an eraser or SAE acts on: ``axis`` if given, else ``dim``, else ``channel``, else the last."""
    if axis is not None:
        if axis not in family_axes:
            raise SiteError(f"axis {axis!r} is not an axis of this family ({', '.join(family_axes)})")
        return axis
    for name in ("dim", "channel"):
        if name in family_axes:
            return name
    return family_axes[-1]


def _to_last(t: torch.Tensor, dim: int) -> torch.Tensor:
    return t if dim in (-1, t.ndim - 1) else t.movedim(dim, -1)


def _from_last(t: torch.Tensor, dim: int) -> torch.Tensor:
    return t if dim in (-1, t.ndim - 1) else t.movedim(-1, dim)


@dataclass
class Erase(Intervention):
    """Apply a :class:`ConceptEraser` along the feature axis (``dim`` / ``channel`` unless ``axis``)."""

    kind: ClassVar[str] = "erase"
    proj_left: torch.Tensor = None  # type: ignore[assignment]
    proj_right: torch.Tensor = None  # type: ignore[assignment]
    bias: torch.Tensor | None = None
    axis: str | None = None

    @classmethod
    def from_eraser(cls, eraser: ConceptEraser, axis: str | None = None) -> "Erase":
        return cls(eraser.proj_left, eraser.proj_right, eraser.bias, axis)

    @property
    def eraser(self) -> ConceptEraser:
        left, right = torch.as_tensor(self.proj_left), torch.as_tensor(self.proj_right)
        return ConceptEraser(left, right, None if self.bias is None else torch.as_tensor(self.bias))

    def apply(self, x: torch.Tensor, ctx: ApplyContext) -> torch.Tensor:
        name = feature_axis(ctx.family.axis_names, self.axis)
        i = ctx.family.axis_names.index(name)
        if ctx.index[i] != slice(None):
            raise SiteError(f"Erase at {ctx.site}: it acts on the whole {name!r} axis; do not select it")
        d = torch.as_tensor(self.proj_left).shape[0]
        if x.shape[i + 1] != d:
            raise SiteError(f"Erase at {ctx.site}: the eraser was fitted on {d} features but {name!r} has {x.shape[i + 1]}")
        return _from_last(self.eraser(_to_last(x, i + 1)), i + 1)


def site_activations(
    model: "WrappedModel | nn.Module",
    inputs: Any,
    site: "str | Site",
    *,
    axis: str | None = None,
    interventions: Any = None,
) -> torch.Tensor:
    """The activations at ``site`` as rows ``[batch * other selected elements, features]``.

    The feature axis (``axis``, by default ``dim`` or ``channel``) becomes the last; every other
    axis is flattened into rows, batch first, so a per-input label repeats ``rows // batch`` times
    with ``labels.repeat_interleave``. ``interventions`` are applied first (the capture is taken
    after them), e.g. ``{site: eraser}`` to read erased activations.
    """
    m = wrap(model)
    site = m.catalog.resolve(site)
    if site.is_pattern:
        raise SiteError(f"site_activations needs one concrete site, got the pattern {site}")
    fam = m.catalog.family(site.family)
    name = feature_axis(fam.axis_names, axis)
    if name in site.selection:
        raise SiteError(f"{site}: the feature axis {name!r} is taken whole; do not select it")
    run = m.run(inputs, interventions, capture=[site.key])
    acts = run.cache[site]  # every axis kept
    i = fam.axis_names.index(name) + 1
    return _to_last(acts, i).reshape(-1, acts.shape[i])


def fit_eraser(
    model: "WrappedModel | nn.Module",
    inputs: Any,
    site: "str | Site",
    labels: torch.Tensor,
    *,
    method: Method = "leace",
    axis: str | None = None,
    affine: bool = True,
    tol: float = 1e-8,
) -> Erase:
    """Fit an eraser on the activations of ``site`` for ``inputs`` and return it as an intervention.

    ``labels`` has one entry per input (repeated over the site's other selected elements, e.g.
    positions) or one per activation row of :func:`site_activations`.
    """
    x = site_activations(model, inputs, site, axis=axis)
    labels = torch.as_tensor(labels)
    if labels.shape[0] != x.shape[0]:
        if x.shape[0] % labels.shape[0]:
            raise ValueError(
                f"{labels.shape[0]} labels for {x.shape[0]} activation rows at {site}; give one per input or one per row"
            )
        labels = labels.repeat_interleave(x.shape[0] // labels.shape[0], dim=0)
    eraser = fit_leace(x, labels, method=method, affine=affine, tol=tol)
    logger.info("fitted a %s eraser of rank %d at %s on %d rows", method, eraser.rank, site, x.shape[0])
    return Erase.from_eraser(eraser, axis)


def probe_accuracy(
    x_train: torch.Tensor,
    z_train: torch.Tensor,
    x_test: torch.Tensor,
    z_test: torch.Tensor,
    *,
    steps: int = 300,
    lr: float = 0.05,
    weight_decay: float = 1e-4,
    seed: int = 0,
) -> float:
    """Held-out accuracy of a linear probe (multinomial logistic regression, trained with torch).

    Features are standardised with the training statistics; the probe is trained full-batch with
    Adam for ``steps`` steps from a seeded initialisation, so the number is reproducible.
    """
    gen = torch.Generator().manual_seed(seed)
    xtr, xte = x_train.detach().double().cpu(), x_test.detach().double().cpu()
    mu, sd = xtr.mean(0), xtr.std(0).clamp_min(1e-8)
    xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
    classes, ytr = torch.unique(torch.as_tensor(z_train).cpu(), return_inverse=True)
    lookup = {int(c): i for i, c in enumerate(classes.tolist())}
    yte = torch.tensor([lookup.get(int(c), -1) for c in torch.as_tensor(z_test).cpu().tolist()])
    weight = (0.01 * torch.randn(xtr.shape[1], len(classes), generator=gen, dtype=torch.float64)).requires_grad_()
    bias = torch.zeros(len(classes), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([weight, bias], lr=lr, weight_decay=weight_decay)
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(xtr @ weight + bias, ytr)
            loss.backward()
            opt.step()
    with torch.no_grad():
        pred = (xte @ weight + bias).argmax(dim=1)
    return float((pred == yte).double().mean())
