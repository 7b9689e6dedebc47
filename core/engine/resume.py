"""Prefix reuse: start a forward at a later block, and in causal models at a later position.

An intervention at layer ``L`` cannot change anything computed before block ``L``; in a causal
model, an intervention at position ``p`` cannot change positions before ``p``. A :class:`Resume`
asks the adapter to restart from a :class:`Prefix` kept from one unpatched run of the same
inputs: the residual entering every block (layer-prefix reuse) and, for causal models, every
layer's keys and values (position-prefix reuse). The resumed run computes blocks ``L..`` on
positions ``p..`` only, so sites there see activations ``p`` positions shorter; :func:`windowed`
rewrites a site for that shorter run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..sites.catalog import Catalog
from ..sites.site import Site, SiteError, Span

__all__ = ["Prefix", "Resume", "start_of", "windowed"]


@dataclass
class Prefix:
    """What one unpatched run keeps so later runs of the same inputs can start part-way.

    ``residuals[l]`` is the residual entering block ``l`` (``[batch, pos, d]``), ``keys_values[l]``
    that block's attention keys and values (causal models only, else empty), ``output`` the
    run's primary output (its first positions are reused as they are) and ``causal`` whether
    positions may be skipped.
    """

    residuals: list[torch.Tensor]
    output: torch.Tensor
    causal: bool
    keys_values: list[tuple[torch.Tensor, torch.Tensor]]
    length: int

    @property
    def rows(self) -> int:
        return self.output.shape[0]

    def first_rows(self, n: int) -> "Prefix":
        """The prefix of the first ``n`` rows (views, no copy)."""
        if n == self.rows:
            return self
        return Prefix(
            [r[:n] for r in self.residuals], self.output[:n], self.causal,
            [(k[:n], v[:n]) for k, v in self.keys_values], self.length,
        )


@dataclass(frozen=True)
class Resume:
    """Run blocks ``layer..`` on positions ``pos..`` only, everything before taken from ``prefix``.

    The batch is the prefix's rows repeated a whole number of times (as :func:`repeat_rows` makes).
    With ``own_inputs`` (layer 0 only) the rows' inputs may differ from the prefix's from ``pos`` on:
    the run embeds its own inputs there instead of starting from the prefix's residual, and attends
    to the prefix's keys and values before ``pos``, which the inputs share.
    """

    prefix: Prefix
    layer: int
    pos: int = 0
    own_inputs: bool = False
    # Rows joining part-way: ``(site key, copies)`` with the site the residual entering its block (``resid_pre.l``):
    # ``copies`` more copies of the prefix's rows join the batch there, holding the prefix's residual at that block
    # (positions ``pos..``), appended after the rows already running. The adapter runs the first ``prefix.rows`` rows
    # from ``layer``; the caller's inputs and row slices cover every row. One-prompt prefixes only: a batch's
    # attention mask, built for the rows the forward starts with, must broadcast over the rows joining.
    joins: tuple[tuple[str, int], ...] = ()

    def __post_init__(self):
        n_layers = len(self.prefix.residuals)
        if not 0 <= self.layer < n_layers:
            raise ValueError(f"resume layer {self.layer} is outside the model's blocks 0..{n_layers - 1}")
        if not 0 <= self.pos < self.prefix.length:
            raise ValueError(f"resume position {self.pos} is outside the inputs' positions 0..{self.prefix.length - 1}")
        if self.own_inputs and self.layer:
            raise ValueError(f"a run on its own inputs starts at the embeddings (layer 0), not layer {self.layer}")
        if self.pos and not self.prefix.causal:
            raise ValueError(
                f"resume position {self.pos}: the model is not causal, so every position depends on every "
                f"other one; only pos=0 (layer-prefix reuse) is possible"
            )
        if self.joins and (self.own_inputs or self.prefix.rows != 1):
            raise ValueError(
                f"rows join a resumed run part-way only from a one-prompt prefix (got {self.prefix.rows} rows) "
                f"resuming at a block (own_inputs={self.own_inputs}); run every row from the start instead"
            )
        for key, copies in self.joins:
            layer = Site.parse(key).layer
            if not (isinstance(layer, int) and self.layer <= layer < n_layers) or copies < 1:
                raise ValueError(
                    f"join {key!r} x {copies}: rows join at a block {self.layer}..{n_layers - 1} of the run, "
                    f"one copy or more"
                )

    @property
    def joined(self) -> int:
        """Rows that join part-way (the run starts with ``prefix.rows``)."""
        return self.prefix.rows * sum(copies for _, copies in self.joins)


def _lowest(value, size: int) -> int | None:
    """The lowest position a selector touches (None: it may touch position 0)."""
    if isinstance(value, int):
        return value % size
    if isinstance(value, Span):
        start = value.start if value.start is not None else 0
        return start % size if start < 0 else start
    if isinstance(value, tuple) and value:
        return min(i % size for i in value)
    return None


def start_of(site: Site, catalog: Catalog, length: int, causal: bool) -> tuple[int, int] | None:
    """The latest ``(layer, pos)`` a run patching ``site`` may resume from, or None (no reuse).

    Sites without a layer (embeddings, logits) are computed outside the blocks and cannot resume;
    a site's position counts only in causal models and only for families with a ``pos`` axis.
    """
    if not isinstance(site.layer, int):
        return None
    family = catalog.family(site.family)
    pos = 0
    if causal and "pos" in family.axis_names and "pos" in site.selection:
        pos = _lowest(site.selection["pos"], length) or 0
    return site.layer, pos


def windowed(site: Site, pos: int, length: int) -> Site:
    """``site`` as a run computing positions ``pos..length`` only sees it (its ``pos`` shifted by ``-pos``)."""
    if pos == 0:
        return site
    if "pos" not in site.selection:
        raise SiteError(
            f"site {site} covers every position, also those before the resumed run's first position {pos}; "
            f"select positions >= {pos} or resume at pos=0"
        )
    value = site.selection["pos"]

    def shift(i: int) -> int:
        j = i % length
        if j < pos:
            raise SiteError(
                f"site {site} touches position {j}, before the resumed run's first position {pos}; "
                f"resume at pos <= {j}"
            )
        return j - pos

    if isinstance(value, int):
        return site.with_(pos=shift(value))
    if isinstance(value, Span):
        start = shift(value.start if value.start is not None else 0)
        stop = None if value.stop is None else (value.stop % length if value.stop < 0 else value.stop) - pos
        return site.with_(pos=Span(start, stop))
    if isinstance(value, tuple):
        return site.with_(pos=tuple(shift(i) for i in value))
    raise SiteError(f"site {site}: cannot window the pattern {value!r}; expand it first")


# A forward costs about this many token rows (a prompt at one position) per block on top of the rows it
# computes: on a CPU a matmul with few rows reads its whole weight for them (measured at d_model 768: one
# row costs as much as four to five rows of a large batch), and each block adds hooks and Python. Batches
# are planned with this cost model (:func:`resume_chunks`).
FORWARD_OVERHEAD_TOKENS = 8
MERGE_POSITIONS = True  # False: each position its own group (for measuring what joining positions saves)


def resume_chunks(
    sites: Sequence[Site],
    catalog: Catalog,
    prefix: Prefix | None,
    per_forward: int,
    tokens_per_forward: int | None = None,
    overhead: int = FORWARD_OVERHEAD_TOKENS,
    join_at: str | None = None,
) -> list[tuple[list[int], Resume | None]]:
    """Batches of ``sites`` (indices, at most ``per_forward`` each) and where each batch may resume.

    Without a prefix the batches follow the sweep's order and run the whole model. With one, sites
    are grouped by the position they may start at and ordered by layer; a batch resumes at its
    first site's layer and the group's position, so its later sites recompute the blocks between
    their layer and the batch's. Each group's sites are split into the batches of least cost
    (exactly, by dynamic programming) under the model ``blocks run x (overhead + token rows)``: a
    site's token rows are the prompts times the positions from the group's start on, and
    ``overhead`` is a forward's fixed cost per block in token rows. From the last position down, a
    position's sites join the next earlier position's group (their runs computing the positions
    between as well) while that plan costs less than two. ``tokens_per_forward`` caps a batch's
    token rows (a site with more runs alone), as ``per_forward`` caps its sites.

    ``join_at`` (the family of the residual entering a block, ``"resid_pre"``; one-prompt prefixes only): a
    batch's later sites do not recompute the blocks before their own. Their rows join the run at their block,
    holding the prefix's residual there (:attr:`Resume.joins`), so a batch costs
    ``(n_layers - first layer) x overhead + token rows x sum over its sites of (n_layers - layer)``.
    """
    if prefix is None:
        return [(list(range(i, min(i + per_forward, len(sites)))), None) for i in range(0, len(sites), per_forward)]
    n_layers, rows, length = len(prefix.residuals), prefix.rows, prefix.length
    join = join_at is not None and rows == 1
    starts = [start_of(site, catalog, length, prefix.causal) for site in sites]
    whole = [i for i in range(len(sites)) if starts[i] is None]
    chunks: list[tuple[list[int], Resume | None]] = [
        (whole[i : i + per_forward], None) for i in range(0, len(whole), per_forward)
    ]
    by_pos: dict[int, list[int]] = {}
    for i in sorted((i for i in range(len(sites)) if starts[i] is not None), key=lambda i: (starts[i], i)):
        by_pos.setdefault(starts[i][1], []).append(i)  # type: ignore[index]
    def plan(pos: int, members: list[int]) -> tuple[float, list[tuple[list[int], Resume]]]:
        members = sorted(members, key=lambda i: (starts[i][0], i))  # type: ignore[index]
        tokens = rows * (length - pos)  # every site of the group computes the same token rows
        most = per_forward if tokens_per_forward is None else min(per_forward, max(1, tokens_per_forward // tokens))
        layers = [starts[i][0] for i in members]  # type: ignore[index]
        split = _least_cost_split(layers, n_layers, tokens, overhead, most, join)
        cost = sum(_batch_cost(layers[lo:hi], n_layers, tokens, overhead, join) for lo, hi in split)
        return cost, [(members[lo:hi], Resume(prefix, layers[lo], pos, joins=_joins(layers[lo:hi], join_at) if join else ()))
                      for lo, hi in split]

    # From the last position down, a position's sites join the next earlier position's group (computing the
    # positions between too) while one plan of both costs less than two.
    groups = sorted(by_pos.items(), reverse=True)
    current: tuple[int, list[int]] | None = None
    for pos, members in groups:
        if current is not None:
            if MERGE_POSITIONS and plan(pos, current[1] + members)[0] < plan(*current)[0] + plan(pos, members)[0]:
                current = (pos, current[1] + members)
                continue
            chunks.extend(plan(*current)[1])
        current = (pos, members)
    if current is not None:
        chunks.extend(plan(*current)[1])
    return chunks


def _batch_cost(layers: list[int], n_layers: int, tokens: int, overhead: int, join: bool) -> int:
    """A batch of sites at ``layers`` (ascending) under the cost model: every block it runs costs ``overhead`` plus
    its token rows, all sites' from the first layer on, or (``join``) each site's from its own layer on."""
    if join:
        return (n_layers - layers[0]) * overhead + tokens * sum(n_layers - layer for layer in layers)
    return (n_layers - layers[0]) * (overhead + len(layers) * tokens)


def _joins(layers: list[int], family: str) -> tuple[tuple[str, int], ...]:
    """The joins of a batch of sites at ``layers`` (ascending): every site but the first joins at its block."""
    counts: dict[int, int] = {}
    for layer in layers[1:]:
        counts[layer] = counts.get(layer, 0) + 1
    return tuple((f"{family}.{layer}", copies) for layer, copies in counts.items())


def _least_cost_split(layers: list[int], n_layers: int, tokens: int, overhead: int, most: int,
                      join: bool = False) -> list[tuple[int, int]]:
    """Contiguous batches ``[lo, hi)`` of sites at ``layers`` (ascending), at most ``most`` each, of least total
    cost (:func:`_batch_cost`)."""
    k = len(layers)
    best = [0] + [None] * k  # best[j]: least cost of the first j sites
    cut = [0] * (k + 1)
    blocks = [0]  # blocks[j]: sum of (n_layers - layer) over the first j sites
    for layer in layers:
        blocks.append(blocks[-1] + n_layers - layer)
    for j in range(1, k + 1):
        for lo in range(max(0, j - most), j):
            run = (n_layers - layers[lo]) * overhead + tokens * (blocks[j] - blocks[lo] if join else (n_layers - layers[lo]) * (j - lo))
            cost = best[lo] + run  # type: ignore[operator]
            if best[j] is None or cost < best[j]:  # type: ignore[operator]
                best[j], cut[j] = cost, lo
    out, j = [], k
    while j:
        out.append((cut[j], j))
        j = cut[j]
    return out[::-1]
