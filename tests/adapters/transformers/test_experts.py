"""Mixture-of-experts sites (crosspatch.adapters.transformers.experts) on a tiny Mixtral, against a
hand-written router and experts computed from the fused weights."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import crosspatch as cp
from hand_hooks import logits_with
from crosspatch.adapters.transformers.tiny import tiny_model


@pytest.fixture(scope="module")
def mixtral():
    model = tiny_model("mixtral", initializer_range=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model, cp.wrap(model)


def ids(seed: int) -> torch.Tensor:
    return torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(seed))


def by_hand(moe, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits ``[b, p, E]`` and each expert's routed write ``[b, p, E, d]`` from the weights."""
    logits = x @ moe.gate.weight.T
    top, index = logits.softmax(-1).topk(moe.gate.top_k, dim=-1)
    weight = torch.zeros_like(logits).scatter(-1, index, top / top.sum(-1, keepdim=True))
    experts = moe.experts
    writes = []
    for e in range(experts.num_experts):
        gate, up = F.linear(x, experts.gate_up_proj[e]).chunk(2, dim=-1)
        writes.append(F.linear(F.silu(gate) * up, experts.down_proj[e]) * weight[..., e, None])
    return logits, torch.stack(writes, dim=2)


def moe_input(model, layer: int, x: torch.Tensor) -> torch.Tensor:
    seen = []
    handle = model.model.layers[layer].mlp.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return seen[0]


def test_expert_writes_and_router_logits_equal_a_hand_written_router_and_experts(mixtral):
    model, m = mixtral
    assert {"expert_out", "router_logits"} <= {f.name for f in m.sites()}, m.catalog.unavailable
    x = ids(0)
    cache = m.capture(x, ["expert_out.1", "router_logits.1", "mlp_out.1"])
    with torch.no_grad():
        logits, writes = by_hand(model.model.layers[1].mlp, moe_input(model, 1, x))
    torch.testing.assert_close(cache["router_logits.1"], logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(cache["expert_out.1"], writes, atol=1e-5, rtol=0)
    assert (writes == 0).all(-1).sum() == writes.shape[0] * writes.shape[1] * (writes.shape[2] - 2)  # two experts routed
    torch.testing.assert_close(cache["expert_out.1"].sum(2), cache["mlp_out.1"], atol=1e-5, rtol=0)  # no shared expert


def test_an_expert_zeroed_equals_its_write_removed_by_hand_and_an_unrouted_patch_changes_nothing(mixtral):
    model, m = mixtral
    x, other = ids(0), ids(1)
    moe = model.model.layers[1].mlp

    def remove_expert_2(module, args, output):
        return output - by_hand(module, args[0])[1][:, :, 2]

    got = m.run(x, {"expert_out.1[expert=2]": cp.Zero()}).output
    torch.testing.assert_close(got, logits_with(model, moe, remove_expert_2, x), atol=1e-5, rtol=0)
    assert not torch.allclose(got, model(x).logits.detach(), atol=1e-4)  # the expert mattered

    here, there = (m.capture(inp, ["expert_out.1"])["expert_out.1"] for inp in (x, other))
    neither = ((here == 0).all(-1) & (there == 0).all(-1)).nonzero()  # [b, pos, expert] routed in neither run
    b, pos, k = (int(i) for i in neither[0])
    patched = m.run(x[b:b + 1], {f"expert_out.1[pos={pos},expert={k}]": cp.Patch(m.capture(other[b:b + 1], ["expert_out.1"]))})
    with torch.no_grad():
        assert torch.equal(patched.output, model(x[b:b + 1]).logits)


def test_router_logits_are_captured_not_written(mixtral):
    _, m = mixtral
    cache = m.capture(ids(0), ["router_logits.0"])
    with pytest.raises(cp.SiteError, match="captured but not intervened on"):
        m.run(ids(1), {"router_logits.0": cp.Patch(cache)})
