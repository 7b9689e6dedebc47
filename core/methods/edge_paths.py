"""Which kept edges of an edge graph lie on a path from the input to the output.

Nodes: ``embed`` (the input), every sender, every receiver and the output behind ``logits_in``. Inside a
node, a head's query/key/value inputs (``head_in.l[qkv=r,head=h]``) feed its write (``head_out.l[head=h]``)
and ``mlp_in.l`` feeds ``mlp_out.l``; between nodes, the kept edges. An edge ``s -> r`` is *connected*
when ``s`` is reachable from ``embed`` and ``r`` reaches ``logits_in``, both through kept edges only.
A disconnected edge can only move the output through a node that no kept path feeds or reads, so a
circuit that keeps it explains nothing more with it (ACDC's pruning of redundant nodes).
"""

from __future__ import annotations

import numpy as np

from ..sites.site import Site, split_tower

__all__ = ["sender_of", "connected"]


def sender_of(receiver: str) -> str | None:
    """The sender a receiver feeds inside its node (``None`` for ``logits_in``, the output); a tower prefix
    (``vision.head_in.1[...]``) carries over."""
    site = Site.parse(receiver)
    prefix, role = split_tower(site.family)
    if role == "head_in":
        return f"{prefix}head_out.{site.layer}[head={site.selection['head']}]"
    if role == "mlp_in":
        return f"{prefix}mlp_out.{site.layer}"
    if role == "logits_in":
        return None
    raise ValueError(f"{receiver!r} is not a receiver of an edge graph (head_in, mlp_in or logits_in)")


def connected(graph, kept: "np.ndarray") -> np.ndarray:
    """A copy of ``kept`` (``[n_edges]``, nonzero = kept) with every edge off an input-to-output path set to 0."""
    kept = np.asarray(kept)
    on = kept != 0
    feeds = [sender_of(r) for r in graph.receivers]
    sender_index = {name: i for i, name in enumerate(graph.senders)}
    internal = [sender_index.get(f) if f is not None else None for f in feeds]

    # Forward from embed: edges run in topological order of their receivers, and a receiver's node
    # sender comes after every edge into it.
    from_input = np.zeros(len(graph.senders), dtype=bool)
    from_input[0] = True  # the first sender is the embeddings
    reached = np.zeros(len(graph.receivers), dtype=bool)
    by_receiver: dict[int, list[int]] = {}
    for e, (s, r) in enumerate(graph.edges):
        by_receiver.setdefault(r, []).append(e)
    order = sorted(by_receiver, key=lambda r: graph._stage(graph.receivers[r]))
    for r in order:
        reached[r] = any(on[e] and from_input[graph.edges[e][0]] for e in by_receiver[r])
        if reached[r] and internal[r] is not None:
            from_input[internal[r]] = True

    # Backward from logits_in, in reverse order.
    to_output = np.zeros(len(graph.receivers), dtype=bool)
    sender_out = np.zeros(len(graph.senders), dtype=bool)
    for r in reversed(order):
        to_output[r] = internal[r] is None or sender_out[internal[r]]
        if to_output[r]:
            for e in by_receiver[r]:
                if on[e]:
                    sender_out[graph.edges[e][0]] = True

    keep = np.array([on[e] and from_input[s] and to_output[r] for e, (s, r) in enumerate(graph.edges)], dtype=bool)
    out = kept.copy()
    out[~keep] = 0
    return out
