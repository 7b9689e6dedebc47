"""Which kept edges of an edge graph lie on a path from the input to the output.

Nodes: ``embed`` (the input), every sender, every receiver and the output behind ``logits_in``. Inside a
node, a head's query/key/value inputs (``head_in.l[qkv=r,head=h]``) feed its write (``head_out.l[head=h]``; a
key/value head shared by query heads ``a..b-1``, ``head_in.l[qkv=r,head=a:b]``, feeds all their writes)
and ``mlp_in.l`` feeds ``mlp_out.l``; between nodes, the kept edges. An edge ``s -> r`` is *connected*
when ``s`` is reachable from ``embed`` and ``r`` reaches ``logits_in``, both through kept edges only.
A disconnected edge can only move the output through a node that no kept path feeds or reads, so a
circuit that keeps it explains nothing more with it (ACDC's pruning of redundant nodes).
"""

from __future__ import annotations

import numpy as np

from ..sites.site import Site, Span, split_tower

__all__ = ["sender_of", "senders_of", "connected"]


def senders_of(receiver: str) -> list[str]:
    """The senders a receiver feeds inside its node (none for ``logits_in``, the output): a head's input feeds
    its write, a key/value head's (``head_in.l[qkv=1,head=a:b]``, grouped-query attention) the writes of the
    query heads ``a..b-1`` it serves, ``mlp_in.l`` ``mlp_out.l``. A tower prefix (``vision.``) carries over."""
    site = Site.parse(receiver)
    prefix, role = split_tower(site.family)
    if role == "head_in":
        head = site.selection["head"]
        heads = range(head.start, head.stop) if isinstance(head, Span) else [head]
        return [f"{prefix}head_out.{site.layer}[head={h}]" for h in heads]
    if role == "mlp_in":
        return [f"{prefix}mlp_out.{site.layer}"]
    if role == "logits_in":
        return []
    raise ValueError(f"{receiver!r} is not a receiver of an edge graph (head_in, mlp_in or logits_in)")


def sender_of(receiver: str) -> str | None:
    """The one sender a receiver feeds inside its node (``None`` for ``logits_in``, the output); a key/value
    head serving several query heads has several (:func:`senders_of`)."""
    senders = senders_of(receiver)
    if len(senders) > 1:
        raise ValueError(f"{receiver!r} feeds {len(senders)} senders ({', '.join(senders)}); use senders_of")
    return senders[0] if senders else None


def connected(graph, kept: "np.ndarray") -> np.ndarray:
    """A copy of ``kept`` (``[n_edges]``, nonzero = kept) with every edge off an input-to-output path set to 0."""
    kept = np.asarray(kept)
    on = kept != 0
    sender_index = {name: i for i, name in enumerate(graph.senders)}
    internal = [[sender_index[f] for f in senders_of(r)] for r in graph.receivers]  # [] for the output

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
        if reached[r]:
            from_input[internal[r]] = True

    # Backward from logits_in, in reverse order.
    to_output = np.zeros(len(graph.receivers), dtype=bool)
    sender_out = np.zeros(len(graph.senders), dtype=bool)
    for r in reversed(order):
        to_output[r] = not internal[r] or bool(sender_out[internal[r]].any())
        if to_output[r]:
            for e in by_receiver[r]:
                if on[e]:
                    sender_out[graph.edges[e][0]] = True

    keep = np.array([on[e] and from_input[s] and to_output[r] for e, (s, r) in enumerate(graph.edges)], dtype=bool)
    out = kept.copy()
    out[~keep] = 0
    return out
