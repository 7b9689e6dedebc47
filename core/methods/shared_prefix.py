"""A second run of inputs that agree with a first run's over their first positions.

In a causal model nothing at positions ``< p`` depends on the inputs at ``p`` or later, so when a
clean and a corrupt prompt agree on their first ``p`` positions (a prompt pair that differs in one
name, one number, one later token) the second run needs to compute positions ``p..`` only: it
attends to the first run's keys and values for the shared positions and takes its activations
there (:class:`~crosspatch.resume.Resume` with ``own_inputs``). Attribution methods use this for
their capture run after the run with gradients; the values are the same as a full run's.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..engine.adapter import Inputs, batch_size
from ..engine.forward import execute
from ..engine.model import WrappedModel
from ..engine.resume import Prefix, Resume
from ..sites.site import Site

__all__ = ["agreeing_positions", "capture_sharing_prefix", "may_share"]


def agreeing_positions(a: Inputs, b: Inputs, length: int) -> int:
    """How many leading positions ``a`` and ``b`` agree on in every row: tensors laid out ``[rows, length, ..]``
    are compared position by position, anything else must be equal (else 0)."""
    if a.keys() != b.keys():
        return 0
    agree = length
    for key, x in a.items():
        y = b[key]
        if not isinstance(x, torch.Tensor):
            if x != y:
                return 0
            continue
        if not isinstance(y, torch.Tensor) or x.shape != y.shape:
            return 0
        if x.ndim >= 2 and x.shape[1] == length:
            differs = (x != y).reshape(x.shape[0], length, -1).any(dim=2).any(dim=0)
            if bool(differs.any()):
                agree = min(agree, int(differs.nonzero()[0]))
        elif not torch.equal(x, y):
            return 0
    return agree


def may_share(m: WrappedModel, a: Inputs, b: Inputs) -> bool:
    """Whether a run of ``a`` is worth keeping a prefix for a run of ``b``: the adapter can resume and the
    inputs agree on their first position at least."""
    length = m.adapter.sizes(a).get("pos")
    return bool(length) and m.adapter.can_resume(m.module) and agreeing_positions(a, b, length) > 0


def capture_sharing_prefix(
    m: WrappedModel,
    inputs: Inputs,
    capture: Sequence[str],
    output_at: torch.Tensor | None,
    first: tuple[Inputs, Prefix, dict[str, torch.Tensor]] | None,
    output_only: Sequence[str] = (),
) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """Run ``inputs`` capturing ``capture``: ``(output, {key: value}, computed_from)``.

    ``first`` is ``(inputs, prefix, values)`` of a run already made (its prefix and its captured
    ``values`` of the same keys cover at least as many rows, the first ones being these rows'
    counterparts). Where the model is causal and the two inputs agree on their first ``p`` positions,
    only positions ``p..`` are computed (``computed_from = p``) and the values' first ``p`` positions
    are ``first``'s; otherwise it is a whole run (``computed_from = 0``). ``output_only``: as for
    :func:`~crosspatch.engine.execute`.
    """
    n = batch_size(inputs)
    p = 0
    if first is not None and first[1].causal:
        first_inputs, prefix, values = first
        families = [m.catalog.family(Site.parse(k).family) for k in capture]
        if all("pos" in fam.axis_names for fam in families):
            p = agreeing_positions(inputs, {k: _first_rows(v, n) for k, v in first_inputs.items()}, prefix.length)
    if p == 0:
        run = execute(m.module, m.adapter, m.catalog, inputs, capture=list(capture), output_at=output_at,
                      output_only=output_only)
        return run.output, {k: run.cache[k] for k in capture}, 0
    prefix = first[1].first_rows(n)  # type: ignore[index]
    if p == prefix.length:  # the same inputs: the same run
        return prefix.output, {k: first[2][k][:n].detach() for k in capture}, p  # type: ignore[index]
    run = execute(m.module, m.adapter, m.catalog, inputs, capture=list(capture), output_at=output_at,
                  output_only=output_only, resume=Resume(prefix, 0, p, own_inputs=True))
    out = {}
    for key, fam in zip(capture, families):
        axis = 1 + fam.axis_names.index("pos")
        known = first[2][key][:n].detach()  # type: ignore[index]
        window = run.cache[key]
        out[key] = torch.cat([known.narrow(axis, 0, p).to(window.dtype), window], dim=axis)
    return run.output, out, p


def _first_rows(value: Any, n: int) -> Any:
    return value[:n] if isinstance(value, torch.Tensor) and value.ndim else value
