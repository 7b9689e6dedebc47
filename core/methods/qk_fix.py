"""AtP*'s query/key fix (Kramár et al. 2024): the attention softmax taken exactly for query and key inputs.

A head's query or key input reaches the metric through the softmax, which saturates: there the linear
estimate ``(a_source - a_base) . grad`` sees a gradient close to 0 even when patching flips the pattern.
AtP* instead computes the pattern ``A'`` the head would have with that input taken from the source run,
exactly, and linearises the metric in the pattern only::

    estimate(query or key input of head h) = sum_{t, k} dmetric/dA[h, t, k] * (A'[h, t, k] - A[h, t, k])

``A'`` comes from one extra forward of the base inputs in two row blocks (queries patched, keys patched)
that serves every head of every needed layer at once: in it every ``head_in`` slot of those layers is
written, the patched role with the source run's residual and the other roles with the base run's, so
each layer's attention reads the base residual except for the patched role, whatever earlier layers do.
Heads do not interact in their patterns and row ``t`` of a pattern depends on query ``t`` alone, so the
estimate is exact in the pattern per head and per query position. A key at one position moves the
normaliser of every row, so key sites must take every position.

Needs the ``head_in`` (per head q/k/v inputs) and ``attn_pattern`` site families. With grouped-query
attention a key/value head's key input is the mean of its query heads' key slots (``head_in.l[qkv=1,head=a:b]``,
see the transformers adapter's ``inputs``): its term is the sum over the query heads it serves of their
patterns' changes, and each of its slots reports an equal share, as its gradient does, so a key/value head's
AtP* value is the sum over its slots.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..engine.adapter import repeat_rows
from ..engine.forward import Bound, execute
from ..engine.interventions import Intervention
from ..sites.site import Site, SiteError, split_tower

__all__ = ["QKLayer", "ExactPatterns", "qk_layers", "pattern_key", "exact_patterns", "corrected_products"]

QUERY, KEY = 0, 1


@dataclass(frozen=True)
class QKLayer:
    """A ``head_in`` key whose query or key roles some site selects, and its ``attn_pattern`` key."""

    head_in: str
    pattern: str


def pattern_key(head_in_key: str) -> str:
    """The ``attn_pattern`` key of a ``head_in`` key's layer, with its tower prefix (``vision.``) if any."""
    site = Site.parse(head_in_key)
    return f"{split_tower(site.family)[0]}attn_pattern.{site.layer}"


def _is_head_in(site: Site) -> bool:
    return split_tower(site.family)[1] == "head_in"


def _roles(site: Site) -> set[int]:
    qkv = site.selection.get("qkv")
    if qkv is None:
        return {0, 1, 2}
    if isinstance(qkv, int):
        return {qkv % 3}
    if isinstance(qkv, tuple):
        return {i % 3 for i in qkv}
    return set(range(3)[slice(qkv.start, qkv.stop)])


def qk_layers(sites: list[Site], catalog) -> list[QKLayer]:
    """The layers whose query/key inputs ``sites`` touch; refuses selections the fix cannot serve."""
    missing = {Site.parse(pattern_key(s.key)).family for s in sites if _is_head_in(s)} - set(catalog.families)
    if missing:
        raise SiteError(f"qk_fix needs the {', '.join(sorted(missing))} family; {catalog.model_name} has none")
    keys: dict[str, None] = {}
    for site in sites:
        if not _is_head_in(site) or not _roles(site) & {QUERY, KEY}:
            continue
        sel = site.selection
        if "dim" in sel:
            raise SiteError(f"qk_fix scores a head's whole query or key input; site {site} selects dims of it")
        if KEY in _roles(site) and "pos" in sel:
            raise SiteError(
                f"qk_fix: site {site} patches keys at some positions only; a key moves every query's softmax "
                f"normaliser, so key sites must take every position (drop pos=, or qkv=0 for queries)"
            )
        keys[site.key] = None
    return [QKLayer(k, pattern_key(k)) for k in keys]


class _Replace(Intervention):
    """The activation becomes a given tensor (the rows the bound covers)."""

    kind = "_replace"

    def __init__(self, value: torch.Tensor):
        self.value = value

    def apply(self, x, ctx):
        return self.value.to(device=x.device, dtype=x.dtype)


class ExactPatterns(NamedTuple):
    """One layer's patterns ``[n, head, pos, key_pos]`` with the query (key) inputs from the source run, and
    its query heads per key/value head (``group``, 1 without grouped-query attention)."""

    query: torch.Tensor
    key: torch.Tensor
    group: int = 1


def _group(m, head_in_key: str) -> int:
    """Query heads per key/value head at a ``head_in`` key: from its reach's ``kv_heads`` where it has one."""
    fam = m.catalog.family(Site.parse(head_in_key).family)
    heads = fam.axis("head").size
    return heads // getattr(fam.reach, "kv_heads", heads)


def exact_patterns(m, base_in, base: dict[str, torch.Tensor], source: dict[str, torch.Tensor], layers: list[QKLayer]):
    """Per layer an :class:`ExactPatterns`: every head's pattern with its query (key) input taken from
    ``source``'s ``head_in`` and everything else from ``base``'s. One forward."""
    n = next(iter(base.values())).shape[0]
    bounds = []
    for layer in layers:
        b, s = base[layer.head_in], source[layer.head_in].to(base[layer.head_in].dtype)
        for block, role in enumerate((QUERY, KEY)):
            value = b.clone()
            value[:, :, role] = s[:, :, role]
            bounds.append(Bound(Site.parse(layer.head_in), _Replace(value), slice(block * n, (block + 1) * n)))
    run = execute(m.module, m.adapter, m.catalog, repeat_rows(base_in, 2), bounds, capture=[lay.pattern for lay in layers])
    return {lay.head_in: ExactPatterns(run.cache[lay.pattern][:n], run.cache[lay.pattern][n:], _group(m, lay.head_in))
            for lay in layers}


def corrected_products(
    prod: torch.Tensor, grad_pattern: torch.Tensor, pattern: torch.Tensor, patched: "ExactPatterns | tuple"
) -> torch.Tensor:
    """``prod [n, pos, 3, head, dim]`` (AtP's per-element products at a ``head_in`` key) with its query and
    key roles replaced by the exact-pattern terms, spread evenly over the elements each term belongs to
    (a query term over ``dim`` at its position, a key term over every position and ``dim``; a key/value
    head's term over its query heads' slots too), so that summing a site's selection gives its AtP* value."""
    patched = ExactPatterns(*patched)
    out = prod.clone()
    d, positions = prod.shape[-1], prod.shape[1]
    a_query, a_key = (a.to(grad_pattern.dtype) for a in patched[:2])
    pattern = pattern.to(grad_pattern.dtype)
    query = (grad_pattern * (a_query - pattern)).sum(-1)  # [n, head, pos]: row t changed by query t alone
    key = (grad_pattern * (a_key - pattern)).sum(dim=(-1, -2))  # [n, head]
    if patched.group > 1:  # a key/value head: the sum over the query heads it serves, an equal share per slot
        g = patched.group
        key = key.unflatten(1, (-1, g)).mean(-1, keepdim=True).expand(-1, -1, g).flatten(1)
    out[:, :, QUERY] = (query.transpose(1, 2) / d)[..., None].to(out.dtype)
    out[:, :, KEY] = (key[:, None, :, None] / (positions * d)).to(out.dtype)
    return out
