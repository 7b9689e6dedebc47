"""head_in (per head, per q/k/v input) for GPT-NeoX (parallel residual, head-major fused projection) and
BERT / RoBERTa (post-LN, no norm in front of q/k/v): capture, self-patch, per-head reconstruction, gradients."""

from __future__ import annotations

import pytest
import torch

import crosspatch as cp
from conftest import randomize, tiny_bert, tiny_neox, tiny_roberta
from crosspatch.engine.interventions import Patch

MODELS = {
    "neox_parallel": lambda: tiny_neox(parallel=True),
    "neox_sequential": lambda: tiny_neox(parallel=False),
    "bert": lambda: tiny_bert("mlm"),
    "roberta": tiny_roberta,
}


def _sharpened(model):
    """Matrices drawn with std 0.15 (HF's 0.02 leaves attention nearly uniform, hiding query effects)."""
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.copy_(0.15 * torch.randn(p.shape, generator=gen))
    return randomize(model)


@pytest.fixture(scope="module", params=sorted(MODELS))
def wrapped(request):
    return cp.wrap(_sharpened(MODELS[request.param]()))


def _pair():
    gen = torch.Generator().manual_seed(3)
    clean = torch.randint(3, 100, (2, 7), generator=gen)
    corrupt = torch.randint(3, 100, (2, 7), generator=gen)
    return clean, corrupt


def test_capture_holds_the_block_input_and_self_patch_is_exact(wrapped):
    clean, _ = _pair()
    cache = wrapped.capture(clean, ["head_in.*", "resid_pre.*"])
    for layer in range(2):
        pre, head_in = cache[f"resid_pre.{layer}"], cache[f"head_in.{layer}"]
        assert head_in.shape == (*pre.shape[:2], 3, 4, pre.shape[-1])
        assert torch.equal(head_in, pre[:, :, None, None, :].expand_as(head_in))
    plain = wrapped.run(clean).output
    assert torch.equal(wrapped.run(clean, {"head_in.0": Patch(cache), "head_in.1[qkv=1,head=2]": Patch(cache)}).output, plain)


def test_each_heads_inputs_rebuild_exactly_that_heads_write(wrapped):
    """Head 2's q, k and v inputs from the corrupt run: head 2 writes what it writes in the corrupt run, the
    other heads are bit-exact clean (a wrong column order of the fused projection would mix heads)."""
    clean, corrupt = _pair()
    keys = ["head_in.1", "head_out.1", "attn_out.1"]
    c, x = wrapped.capture(clean, keys), wrapped.capture(corrupt, keys)
    run = wrapped.run(clean, {"head_in.1[head=2]": Patch(x)}, capture=["head_out.1"])
    got = run.cache["head_out.1"]
    torch.testing.assert_close(got[:, :, 2], x["head_out.1"][:, :, 2], atol=1e-5, rtol=1e-5)
    assert torch.equal(got[:, :, [0, 1, 3]], c["head_out.1"][:, :, [0, 1, 3]])
    assert (got[:, :, 2] - c["head_out.1"][:, :, 2]).abs().max() > 1e-3
    # every head's inputs from the corrupt run: the whole attention output is the corrupt one
    run = wrapped.run(clean, {"head_in.1": Patch(x)}, capture=["attn_out.1"])
    torch.testing.assert_close(run.cache["attn_out.1"], x["attn_out.1"], atol=1e-5, rtol=1e-5)
    # only head 1's query: head 1 changes, the rest stay bit-exact
    run = wrapped.run(clean, {"head_in.1[qkv=0,head=1]": Patch(x)}, capture=["head_out.1"])
    assert torch.equal(run.cache["head_out.1"][:, :, [0, 2, 3]], c["head_out.1"][:, :, [0, 2, 3]])
    assert (run.cache["head_out.1"][:, :, 1] - c["head_out.1"][:, :, 1]).abs().max() > 1e-4


def test_identity_write_leaves_outputs_and_parameter_gradients_unchanged(wrapped):
    clean, _ = _pair()
    model = wrapped.module

    def grads(interventions):
        model.zero_grad()
        out = wrapped.run(clean, interventions, grad=True).output
        out[:, -1].logsumexp(-1).sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    out_plain, plain = grads(None)
    out_tapped, tapped = grads({"head_in.1": cp.Scale(1.0), "head_in.0[qkv=2]": cp.Scale(1.0)})
    assert torch.equal(out_tapped, out_plain)
    assert plain.keys() == tapped.keys()
    for name in plain:
        torch.testing.assert_close(tapped[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)


def test_edge_graph_of_sequential_neox_and_refusal_for_parallel():
    from crosspatch.methods.edges import edge_graph, patch_edges

    m = cp.wrap(_sharpened(tiny_neox(parallel=False)))
    g = edge_graph(m)
    clean, corrupt = _pair()
    out = patch_edges(m, clean, corrupt, torch.stack([torch.zeros(len(g)), torch.ones(len(g))]), graph=g)
    assert torch.equal(out[:2], m.run(clean).output)
    torch.testing.assert_close(out[2:], m.run(corrupt).output, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="lacks mlp_in, logits_in"):
        edge_graph(cp.wrap(tiny_neox(parallel=True)))
