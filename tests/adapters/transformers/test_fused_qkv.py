"""head_in on fused query/key/value projections found by inference (crosspatch.adapters.transformers.fused_qkv):
the column order found by experiment is the one each model's code uses, the other order fails the proof,
and CodeGen's (neither) is refused with the reason."""

from __future__ import annotations

import dataclasses
import warnings

import pytest

import crosspatch as cp
from crosspatch.adapters.transformers.mapping import mapping_for
from crosspatch.adapters.transformers.proof import prove
from crosspatch.adapters.transformers.tiny import tiny_model


def wrapped(model_type: str):
    model = tiny_model(model_type)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model, cp.wrap(model)


# BLOOM views its fused output as [head, q/k/v, d_head]; MPT chunks it into [q | k | v].
@pytest.mark.parametrize("model_type,head_major", [("bloom", True), ("mpt", False)])
def test_the_order_found_is_the_models_and_the_other_fails_the_proof(model_type, head_major):
    model, m = wrapped(model_type)
    mapping = mapping_for(model)
    assert len(mapping.layout.qkv) == 1 and mapping.layout.head_major is head_major
    assert "head_in" in {f.name for f in m.sites()}, m.catalog.unavailable
    flipped = dataclasses.replace(mapping.layout, head_major=not head_major)
    proof = prove(model, m.adapter, m.catalog, mapping.arch, flipped)
    assert "head_in" in proof.failed and "differs from a hook" in proof.failed["head_in"]


def test_a_fused_projection_of_another_order_is_refused_with_the_reason():
    _, m = wrapped("codegen")  # columns grouped by model-parallel shard, then q/v/k
    assert "neither" in m.catalog.unavailable["head_in"]
