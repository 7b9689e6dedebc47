"""ACDC's pruning of disconnected edges (core/methods/edge_paths.py) on a hand-built one-layer edge graph."""

from __future__ import annotations

import numpy as np
import pytest

from crosspatch.methods.edge_paths import connected, sender_of
from crosspatch.methods.edges import EdgeGraph

SENDERS = ["embed", "head_out.0[head=0]", "head_out.0[head=1]", "mlp_out.0"]
RECEIVERS = ["head_in.0[qkv=0,head=0]", "head_in.0[qkv=0,head=1]", "mlp_in.0", "logits_in"]
EDGES = [(0, 0), (0, 1), (0, 2), (1, 2), (2, 2), (0, 3), (1, 3), (2, 3), (3, 3)]


def _graph() -> EdgeGraph:
    return EdgeGraph(SENDERS, RECEIVERS, EDGES, [], [])


def _names(g: EdgeGraph, mask) -> set[str]:
    return {name for name, k in zip(g.edge_names, mask) if k}


def test_sender_of_each_receiver():
    assert [sender_of(r) for r in RECEIVERS] == ["head_out.0[head=0]", "head_out.0[head=1]", "mlp_out.0", None]
    with pytest.raises(ValueError, match="not a receiver"):
        sender_of("head_out.0[head=0]")


def test_edges_off_every_input_to_output_path_are_removed():
    g = _graph()
    kept = g.mask([
        "embed->head_in.0[qkv=0,head=0]", "head_out.0[head=0]->logits_in",  # a full path: stays
        "head_out.0[head=1]->logits_in",  # head 1 is fed by no kept edge: pruned
        "embed->mlp_in.0",  # the MLP's output reaches nothing kept: pruned
    ]).numpy()
    out = connected(g, kept)
    assert _names(g, out) == {"embed->head_in.0[qkv=0,head=0]", "head_out.0[head=0]->logits_in"}
    assert out.dtype == kept.dtype and _names(g, kept) >= _names(g, out)


def test_a_connected_circuit_is_left_alone_and_chains_count():
    g = _graph()
    names = ["embed->head_in.0[qkv=0,head=0]", "head_out.0[head=0]->mlp_in.0", "mlp_out.0->logits_in", "embed->logits_in"]
    kept = g.mask(names).numpy()
    np.testing.assert_array_equal(connected(g, kept), kept)
    # cut the chain's first link: head 0, then the MLP, lose their input; only embed->logits_in is left
    cut = g.mask(names[1:]).numpy()
    assert _names(g, connected(g, cut)) == {"embed->logits_in"}
    assert not connected(g, np.zeros(len(EDGES))).any()
