"""Transcoders that read the MLP's normed input (GemmaScope's ``ln2.hook_normalized``, ``normalized_input=True``).

Such a transcoder's input sites are still ``mlp_in.L`` (the residual before the MLP's norm), and it reads
``norm(mlp_in.L)``. The norm is the module whose clean input is ``mlp_in.L``: :func:`mlp_norms` finds it among
the modules :class:`.freeze.FrozenNorms` recorded, by equality of the recorded input with the captured site.
In the local replacement model the norm's scale is frozen, so the transcoder reads
:func:`frozen_input` ``= y_clean + J (x - x_clean)`` (``J = w * center(.) / sigma_clean``, the frozen norm's map):
affine in ``mlp_in``, exactly the module's output at the clean run, and what edges into features differentiate.
In the real model (feature interventions) it reads :func:`live_input`, the norm's closed form with its own
scale, which the recording checked against the module.
"""

from __future__ import annotations

import torch

from .freeze import FrozenNorms, _apply, _linear, _Norm, _sigma

__all__ = ["mlp_norms", "frozen_input", "live_input"]


def mlp_norms(norms: FrozenNorms, mlp_in: "dict[int, torch.Tensor]") -> dict[int, _Norm]:
    """Per layer, the recorded norm module whose clean input equals the clean ``mlp_in.L`` (``[pos, d]`` or
    ``[1, pos, d]``); an error naming the layer when none does, or when several different modules do."""
    out: dict[int, _Norm] = {}
    for L, x in mlp_in.items():
        x = x if x.ndim == 3 else x[None]
        hits = [n for n in norms.norms if n.x is not None and n.x.shape == x.shape
                and torch.equal(n.x.to(x.dtype), x)]
        if not hits:
            raise ValueError(
                f"no norm module reads mlp_in.{L}: a transcoder with normalized_input=True reads the MLP's norm output, "
                f"and none of the model's recognised norms ({', '.join(n.name for n in norms.norms) or 'none'}) has "
                f"mlp_in.{L} as its input"
            )
        if len({id(n.module) for n in hits}) > 1:
            raise ValueError(f"several norm modules read mlp_in.{L} ({', '.join(n.name for n in hits)}); which one the "
                             f"MLP reads is ambiguous")
        out[L] = hits[0]
    return out


def frozen_input(norm: _Norm, x: torch.Tensor) -> torch.Tensor:
    """The norm's output with its scale frozen at the clean run, for ``x`` ``[rows, pos, d]``."""
    delta = _linear(norm, x - norm.x.to(x.dtype), norm.sigma, norm.form)
    return norm.y.to(x.dtype) + delta


def live_input(norm: _Norm, x: torch.Tensor) -> torch.Tensor:
    """The norm's output with its own scale (its closed form), for ``x`` ``[..., d]``."""
    work = x.double() if x.dtype == torch.float64 else x.float()
    return _apply(norm, work, _sigma(work, norm.center, norm.eps), norm.form).to(x.dtype)
