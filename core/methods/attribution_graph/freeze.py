"""What the local replacement model holds fixed at the clean run: attention patterns and norm scales.

Attention patterns are a site (``attn_pattern``): :func:`pattern_bounds` writes the clean pattern
back at every layer, so no gradient or perturbation reaches the queries and keys. Norm scales are no
site of the vocabulary, so :class:`FrozenNorms` hooks the model's norm modules themselves: while
:meth:`FrozenNorms.recording` it reads each norm's scale ``sigma = sqrt(var(x) + eps)`` (LayerNorm) or
``sqrt(mean(x^2) + eps)`` (RMSNorm) at the clean run and checks that the closed form it will use
reproduces the module's output there (else it refuses, naming the module); while
:meth:`FrozenNorms.frozen` each norm returns ``w * center(x) / sigma_clean + b`` (``(1 + w)`` for a
Gemma-style RMSNorm), which is linear in ``x``; it is applied as ``y_clean + J (x - x_clean)``, so the clean
input gives the module's own clean output bit for bit. Recognised norms: ``torch.nn.LayerNorm`` and modules
whose class name contains ``LayerNorm`` or ``RMSNorm`` holding a ``weight`` and an epsilon
(``eps`` / ``variance_epsilon``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from ...engine.forward import Bound
from ...engine.interventions import Fn
from ...engine.reach import temporarily
from ...sites.site import Site

__all__ = ["FrozenNorms", "NormError", "find_norms", "pattern_bounds"]


class NormError(TypeError):
    """A norm module whose computation the frozen-scale closed forms do not reproduce."""


@dataclass
class _Norm:
    name: str
    module: nn.Module
    eps: float
    center: bool  # LayerNorm subtracts the mean; RMSNorm does not
    form: str | None = None  # "w", "1+w" or "none" once checked against the module
    sigma: torch.Tensor | None = None  # [rows, ..., 1] at the clean run
    x: torch.Tensor | None = None  # the clean input and output: the frozen norm is exact there
    y: torch.Tensor | None = None


def _eps(module: nn.Module) -> float | None:
    for attr in ("eps", "variance_epsilon", "epsilon"):
        value = getattr(module, attr, None)
        if isinstance(value, (int, float)):
            return float(value)
    return None


def find_norms(model: nn.Module) -> list[_Norm]:
    """Every norm module of ``model`` the frozen forward linearises (see the module doc)."""
    found = []
    for name, module in model.named_modules():
        cls = type(module).__name__.lower()
        if isinstance(module, nn.LayerNorm):
            found.append(_Norm(name, module, float(module.eps), center=True))
        elif ("rmsnorm" in cls or "layernorm" in cls) and _eps(module) is not None:
            found.append(_Norm(name, module, _eps(module), center="rms" not in cls))
    return found


def _sigma(x: torch.Tensor, center: bool, eps: float) -> torch.Tensor:
    x = x.double() if x.dtype == torch.float64 else x.float()  # half precision norms compute in float32
    if center:
        x = x - x.mean(-1, keepdim=True)
    return (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()


def _linear(norm: _Norm, x: torch.Tensor, sigma: torch.Tensor, form: str) -> torch.Tensor:
    """The norm with its scale fixed at ``sigma`` and without its bias: linear in ``x``."""
    h = x - x.mean(-1, keepdim=True) if norm.center else x
    h = h / sigma.to(x.dtype)
    weight = getattr(norm.module, "weight", None)
    if weight is not None and form != "none":
        h = h * (weight + 1 if form == "1+w" else weight).to(x.dtype)
    return h


def _apply(norm: _Norm, x: torch.Tensor, sigma: torch.Tensor, form: str) -> torch.Tensor:
    h = _linear(norm, x, sigma, form)
    bias = getattr(norm.module, "bias", None)
    if isinstance(bias, torch.Tensor):
        h = h + bias.to(x.dtype)
    return h


class FrozenNorms:
    """Norm scales read at the clean run and held fixed afterwards (see the module doc)."""

    def __init__(self, model: nn.Module):
        self.norms = find_norms(model)

    @contextlib.contextmanager
    def recording(self) -> Iterator["FrozenNorms"]:
        """Hooks that read each norm's scale during one (clean) forward and check the closed form."""

        def hook(norm: _Norm):
            def fn(module, args, output):
                x = args[0]
                sigma = _sigma(x.detach(), norm.center, norm.eps)
                out = output.detach().to(sigma.dtype)
                for form in ("w", "1+w", "none"):
                    mine = _apply(norm, x.detach().to(sigma.dtype), sigma, form)
                    if torch.allclose(mine, out, rtol=1e-4, atol=1e-4 * float(out.abs().max().clamp_min(1))):
                        norm.form, norm.sigma, norm.x, norm.y = form, sigma, x.detach(), output.detach()
                        return None
                gap = float((_apply(norm, x.detach().to(sigma.dtype), sigma, "w") - out).abs().max())
                raise NormError(
                    f"norm {norm.name} ({type(module).__name__}) is not reproduced by w * center(x) / sqrt(var + eps) "
                    f"+ b (largest difference {gap:.3g}); its scale cannot be frozen by closed form"
                )
            return fn

        for norm in self.norms:
            norm.form = norm.sigma = None
        with temporarily() as changes:
            for n in self.norms:
                changes.forward_hook(n.module, hook(n))
            yield self

    def detach(self) -> None:
        """Copy the recorded scales out of inference mode (a clean run's tensors cannot enter autograd)."""
        for norm in self.norms:
            if norm.sigma is not None:
                norm.sigma, norm.x, norm.y = norm.sigma.clone(), norm.x.clone(), norm.y.clone()

    @contextlib.contextmanager
    def frozen(self) -> Iterator["FrozenNorms"]:
        """Hooks under which every recorded norm divides by its clean scale (linear in its input)."""

        def hook(norm: _Norm):
            def fn(module, args, output):
                # y_clean + J (x - x_clean): exactly the module's clean output at the clean input (a norm computing
                # in float32 inside a float64 model included) and linear with the scale frozen everywhere else
                x = args[0]
                delta = _linear(norm, x - norm.x.to(x.dtype), norm.sigma, norm.form)
                return (norm.y.to(x.dtype) + delta).to(output.dtype)
            return fn

        with temporarily() as changes:
            for n in self.norms:
                if n.sigma is not None:
                    changes.forward_hook(n.module, hook(n))
            yield self


def pattern_bounds(layers: "list[int]", patterns: "dict[int, torch.Tensor]") -> list[Bound]:
    """Bounds writing each layer's clean attention pattern (``[1, head, pos, key_pos]``) over every row."""

    def hold(clean: torch.Tensor):
        return Fn(lambda x: clean.to(x.dtype).expand_as(x))

    return [Bound(Site.parse(f"attn_pattern.{layer}"), hold(patterns[layer])) for layer in layers]
