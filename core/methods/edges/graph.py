"""The edge graph of a residual model: its senders (``embed``, ``head_out``, ``mlp_out``), its receivers
(``head_in`` per query, key and value, ``mlp_in``, ``logits_in``) and an edge from every sender to every
receiver after it, in topological order, with the index maps the edge methods use; :func:`edge_graph`
builds it from a model's catalog (per tower for a two-tower model), and ``_role`` / ``_layer`` tell a
site key's family role and block. Under grouped-query attention a key or value receiver is a key/value head
(``head_in.l[qkv=r,head=a:b]``): :func:`spread_groups` puts its mask on every slot of the group and
:func:`fold_groups` sums the slots' scores into it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from ...engine.model import WrappedModel, wrap
from ...sites.site import Site, split_tower

NEEDED = ("embed", "head_out", "mlp_out", "head_in", "mlp_in", "logits_in")


@dataclass
class EdgeGraph:
    """Senders, receivers and edges, each in topological order, plus the index maps the methods use."""

    senders: list[str]  # node names, e.g. "embed", "head_out.0[head=1]", "mlp_out.0"
    receivers: list[str]  # "head_in.1[qkv=0,head=2]", "mlp_in.0", "logits_in"
    edges: list[tuple[int, int]]  # (sender index, receiver index)
    sender_keys: list[tuple[str, int]]  # (site key, number of senders in it), in firing order
    receiver_keys: list[tuple[str, int, tuple[int, ...]]]  # (site key, incoming senders = a prefix, slot shape)
    receiver_of: list[tuple[int, tuple[int, ...]]] = field(default_factory=list)  # receiver -> (key index, slot)
    tower: str = ""  # the family prefix of a two-tower model's tower ("vision."), else ""
    # Query heads per key/value head (grouped-query attention; 1 otherwise). A key or value receiver is then a
    # key/value head, ``head_in.l[qkv=r,head=a:b]`` over its query heads' slots; its slot in ``receiver_of`` is
    # the group's first (scores are summed there, masks spread over the group).
    kv_group: int = 1

    @property
    def nodes(self) -> list[str]:
        """Every node once, in topological order (receivers before the senders of the same stage)."""
        return [n for _, n in sorted(self._staged(), key=lambda item: item[0])]

    def _staged(self):
        for i, s in enumerate(self.senders):
            yield (self._stage(s), 1, i), s
        for i, r in enumerate(self.receivers):
            yield (self._stage(r), 0, i), r

    @staticmethod
    def _stage(name: str) -> int:
        site = Site.parse(name)
        role = _role(site.family)
        if role == "embed":
            return 0
        if role == "logits_in":
            return 1 << 30
        return 2 * int(site.layer) + (1 if role in ("head_out", "head_in") else 2)

    @property
    def edge_names(self) -> list[str]:
        return [f"{self.senders[s]}->{self.receivers[r]}" for s, r in self.edges]

    def __len__(self) -> int:
        return len(self.edges)

    def index(self, name: str) -> int:
        """The index of an edge ``"sender->receiver"``."""
        return self.edge_names.index(name)

    def mask(self, names: Sequence[str] = ()) -> torch.Tensor:
        """A ``[n_edges]`` mask with the named edges set."""
        m = torch.zeros(len(self.edges))
        for name in names:
            m[self.index(name)] = 1
        return m


def edge_graph(model: "WrappedModel | nn.Module", tower: str | None = None) -> EdgeGraph:
    """The edge graph of a model whose catalog has embed, head_out, mlp_out, head_in, mlp_in and logits_in;
    for a two-tower model, of one ``tower`` (``"vision"``: the families ``vision.embed``, ...)."""
    m = wrap(model)
    t = f"{tower}." if tower else ""
    missing = [t + f for f in NEEDED if t + f not in m.catalog]
    if missing:
        towers = sorted(t[:-1] for t, role in map(split_tower, m.catalog.families) if t and role == "head_out")
        hint = f"; its towers: {', '.join(towers)} (pass tower=...)" if towers and not tower else ""
        raise ValueError(
            f"an edge graph needs the site families {', '.join(t + f for f in NEEDED)}; {m.catalog.model_name} lacks "
            f"{', '.join(missing)} (the transformers adapter adds head_in / mlp_in / logits_in for pre-LN models){hint}"
        )
    n_layers = m.catalog.family(t + "head_out").layers
    n_heads = m.catalog.family(t + "head_out").axis("head").size
    kv_heads = getattr(m.catalog.family(t + "head_in").reach, "kv_heads", n_heads)  # fewer under grouped-query attention
    group = n_heads // kv_heads
    senders, sender_keys = [t + "embed"], [(t + "embed", 1)]
    receivers: list[str] = []
    receiver_keys: list[tuple[str, int, tuple[int, ...]]] = []
    receiver_of: list[tuple[int, tuple[int, ...]]] = []
    edges: list[tuple[int, int]] = []

    def add_receivers(key: str, names_slots: list[tuple[str, tuple[int, ...]]], slot_shape: tuple[int, ...]):
        k = len(receiver_keys)
        receiver_keys.append((key, len(senders), slot_shape))
        for name, slot in names_slots:
            receiver_of.append((k, slot))
            r = len(receivers)
            receivers.append(name)
            edges.extend((s, r) for s in range(len(senders)))

    for layer in range(n_layers):
        add_receivers(f"{t}head_in.{layer}", _head_receivers(f"{t}head_in.{layer}", n_heads, group), (3, n_heads))
        senders += [f"{t}head_out.{layer}[head={h}]" for h in range(n_heads)]
        sender_keys.append((f"{t}head_out.{layer}", n_heads))
        add_receivers(f"{t}mlp_in.{layer}", [(f"{t}mlp_in.{layer}", ())], ())
        senders.append(f"{t}mlp_out.{layer}")
        sender_keys.append((f"{t}mlp_out.{layer}", 1))
    add_receivers(f"{t}logits_in", [(f"{t}logits_in", ())], ())
    edges.sort(key=lambda e: (EdgeGraph._stage(receivers[e[1]]), e[1], e[0]))
    return EdgeGraph(senders, receivers, edges, sender_keys, receiver_keys, receiver_of, t, group)


def _head_receivers(key: str, n_heads: int, group: int) -> list[tuple[str, tuple[int, int]]]:
    """A layer's head receivers and their slots: every query head, and every key/value head (one per query
    head without grouped-query attention; else the slots ``a:b`` of its query heads, at slot ``a``)."""
    out = [(f"{key}[qkv=0,head={h}]", (0, h)) for h in range(n_heads)]
    for q in (1, 2):
        if group == 1:
            out += [(f"{key}[qkv={q},head={h}]", (q, h)) for h in range(n_heads)]
        else:
            out += [(f"{key}[qkv={q},head={a}:{a + group}]", (q, a)) for a in range(0, n_heads, group)]
    return out


def spread_groups(dense: torch.Tensor, group: int) -> torch.Tensor:
    """Per-slot masks ``[k, n_in, 3, heads]`` with each key/value head's value (at its group's first slot)
    copied to every slot of the group (a key/value head reads their mean); unchanged when ``group`` is 1."""
    if group == 1:
        return dense
    kv = dense[:, :, 1:, ::group]
    return torch.cat([dense[:, :, :1], kv.repeat_interleave(group, dim=-1)], dim=2)


def fold_groups(scores: torch.Tensor, group: int) -> torch.Tensor:
    """Per-slot scores ``[n_in, 3, heads]`` with each key/value head's slots summed into its group's first slot
    (the others 0): a key/value head's credit is the sum of its query heads' slots'."""
    if group == 1:
        return scores
    out = scores.clone()
    kv = scores[:, 1:].unflatten(-1, (-1, group))
    out[:, 1:] = 0
    out[:, 1:, ::group] = kv.sum(-1)
    return out


def _role(family: str) -> str:
    return split_tower(family)[1]


def _layer(key: str, n_layers: int) -> int:
    """The block a sender or receiver key belongs to: -1 for the embeddings, ``n_layers`` for the logits' input."""
    site = Site.parse(key)
    return site.layer if isinstance(site.layer, int) else (-1 if _role(site.family) == "embed" else n_layers)
