"""The per-slot gradients a sink gets (adapters/transformers/slot_grad.py) are made for blocks of rows at once:
every row's ``[role, head, pos - start, d]`` handed to the sink, and the slots' summed gradient, equal the
slot-major gradient of the same term without a sink (each slot's own norm and projection, checked against
autograd in test_slot_gradient_speed_invariants.py), whatever the block size and the sink's start; and EAP's
scores on a tiny GPT-2 are the same made row by row and in one block."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import crosspatch.adapters.transformers.slot_grad as slot_grad
from crosspatch.adapters.transformers.slot_grad import slot_gradient

B, P, R, H, E, D = 5, 6, 3, 4, 5, 16


class _Recorder:
    def __init__(self, start: int):
        self.start = start
        self.rows: dict[int, torch.Tensor] = {}
        self.calls: list[tuple[int, int]] = []

    def __call__(self, row, grads, first_role, head_step):
        assert row not in self.rows
        self.rows[row] = grads.clone()
        self.calls.append((first_role, head_step))


def _case(kind: str):
    gen = torch.Generator().manual_seed(3)
    norm = None if kind == "none" else nn.LayerNorm(D).double() if kind == "layer" else nn.RMSNorm(D, eps=1e-6).double()
    if norm is not None:
        with torch.no_grad():
            norm.weight.copy_(1 + 0.5 * torch.randn(D, generator=gen, dtype=torch.float64))
            if kind == "layer":
                norm.bias.copy_(0.5 * torch.randn(D, generator=gen, dtype=torch.float64))
    x = 2 * torch.randn(B, P, D, generator=gen, dtype=torch.float64) + 0.3
    weight = torch.randn(D, R, H, E, generator=gen, dtype=torch.float64)
    bias = torch.randn(R, H, E, generator=gen, dtype=torch.float64)
    g = torch.randn(B, P, R, H, E, generator=gen, dtype=torch.float64)
    normed = x if norm is None else norm(x)
    output = torch.einsum("bpd,drhe->bprhe", normed, weight) + bias
    return norm, x, weight, bias, g, output


def _grad(norm, x, weight, bias, g, output, sink):
    slots = x[:, :, None, None, :].expand(B, P, R, H, D).clone().requires_grad_()
    zero = slot_gradient(slots, x, norm, weight, output, bias, sink=sink, where=(0, 1))
    (grad,) = torch.autograd.grad((zero * g).sum(), [slots])
    return grad


@pytest.mark.parametrize("kind", ["layer", "rms", "none"])
@pytest.mark.parametrize("start", [0, 2, P])
@pytest.mark.parametrize("block_rows", [1, 2, B])
def test_block_made_sink_gradients_equal_the_slot_major_gradient(monkeypatch, kind, start, block_rows):
    case = _case(kind)
    full = _grad(*case, sink=None)  # [b, p, r, h, d], each slot's own gradient
    per_row = R * H * (P - start) * D * 8
    monkeypatch.setattr(slot_grad, "BLOCK_BYTES", per_row * block_rows)
    sink = _Recorder(start)
    summed = _grad(*case, sink=sink)
    if start == P:
        assert sink.rows == {}
    else:
        assert sorted(sink.rows) == list(range(B)) and set(sink.calls) == {(0, 1)}
        for i, got in sink.rows.items():
            torch.testing.assert_close(got, full[i, start:].permute(1, 2, 0, 3), rtol=1e-12, atol=1e-12)
    # The slots' gradient with a sink: every slot gets the mean over slots (their sum spread evenly).
    mean = full.mean(dim=(2, 3), keepdim=True).expand_as(full)
    torch.testing.assert_close(summed, mean, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_eap_scores_are_the_same_row_by_row_in_blocks_and_without_the_sink(monkeypatch, arch):
    import crosspatch as cp
    from conftest import randomize, tiny_gpt2, tiny_llama
    from crosspatch.methods.edges import eap, eap_ig, edge_graph

    model = randomize((tiny_gpt2 if arch == "gpt2" else tiny_llama)()).double()
    m = cp.wrap(model)
    gen = torch.Generator().manual_seed(0)
    clean = torch.randint(2, 100, (4, 7), generator=gen)
    corrupt = clean.clone()
    corrupt[:, 1] = (clean[:, 1] + 5) % 98 + 2  # differs at position 1: the sink gets positions 1..
    corrupt[:, 4] = (clean[:, 4] + 9) % 98 + 2
    metric = cp.metrics.logit_diff(clean[:, -1], (clean[:, -1] + 1) % 100)
    g = edge_graph(m)
    monkeypatch.setattr(slot_grad, "BLOCK_BYTES", 0)  # one row per block
    rows = eap(m, clean, corrupt, metric, graph=g).values
    monkeypatch.setattr(slot_grad, "BLOCK_BYTES", 1 << 30)  # every row in one block
    block = eap(m, clean, corrupt, metric, graph=g).values
    monkeypatch.setattr(slot_grad, "BLOCK_BYTES", 2 * 3 * 4 * 6 * 64 * 8)  # two rows per block, a partial last block
    pairs = eap(m, clean, corrupt, metric, graph=g).values
    plain = eap_ig(m, clean, corrupt, metric, steps=1, graph=g).values  # no sink: the slots' gradients materialised
    names = list(g.edge_names)
    head_in = [i for i, n in enumerate(names) if "->head_in" in n]
    assert head_in and abs(plain[head_in]).max() > 1e-6
    for got in (rows, block, pairs):
        assert abs(got - plain).max() <= 1e-10 * (1 + abs(plain).max())


@pytest.mark.parametrize("kind", ["layer", "rms", "none"])
@pytest.mark.parametrize("with_sink", [False, True])
def test_carried_output_is_output_plus_the_zero_term(kind, with_sink):
    """``carry=True`` returns the projection's output itself with the slots' gradient attached: the same value,
    the same gradient to the slots, and the output's own gradient (to the projection's weight) passed through."""
    norm, x, weight, bias, g, _ = _case(kind)
    got = {}
    for carry in (False, True):
        w = weight.clone().requires_grad_()
        normed = x if norm is None else norm(x).detach()
        output = torch.einsum("bpd,drhe->bprhe", normed, w) + bias
        slots = x[:, :, None, None, :].expand(B, P, R, H, D).clone().requires_grad_()
        sink = _Recorder(2) if with_sink else None
        zero = slot_gradient(slots, x, norm, weight, output, bias, sink=sink, carry=carry)
        value = zero if carry else output + zero
        assert (value is not zero) or carry
        grads = torch.autograd.grad((value * g).sum(), [slots, w])
        got[carry] = (value.detach(), *grads, sink.rows if sink else {})
    assert torch.equal(got[True][0], got[False][0])
    torch.testing.assert_close(got[True][1], got[False][1], rtol=0, atol=0)
    torch.testing.assert_close(got[True][2], got[False][2], rtol=0, atol=0)
    assert got[True][2].abs().max() > 0
    for i, rows in got[False][3].items():
        assert torch.equal(got[True][3][i], rows)
