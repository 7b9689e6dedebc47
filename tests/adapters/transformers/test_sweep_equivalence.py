"""The planned sweep (shared-prefix source run, prefix reuse, sites batched by start) equals a naive
loop of one hand-hooked forward per site, for pairs differing in the middle or at the first token,
with and without padding; and the batch planner's cost model behaves as documented."""

from __future__ import annotations

import pytest
import torch

import crosspatch as cp
from conftest import padded_prompts, randomize, tiny_gpt2
from crosspatch.engine.resume import Prefix, _least_cost_split, resume_chunks, start_of

LENGTH = 10


def _pair(kind: str, pad: str | None):
    clean = padded_prompts(5, rows=3, length=LENGTH, pad=pad)
    corrupt = {k: v.clone() for k, v in clean.items()}
    p = 1 if kind == "first" else LENGTH // 2
    corrupt["input_ids"][:, p] = corrupt["input_ids"][:, p] % 99 + 1  # another token, never 0
    return clean, corrupt


def _last_real(mask: torch.Tensor) -> torch.Tensor:
    return (mask * torch.arange(mask.shape[1])).argmax(dim=1)


def _naive(model, clean, corrupt, answer, distractor, family: str) -> torch.Tensor:
    """``[layers, units]`` denoising effects, one forward per site with plain torch hooks on the HF modules."""
    blocks = model.transformer.h
    rows = torch.arange(answer.shape[0])
    last = _last_real(corrupt["attention_mask"])

    def metric(logits):
        at = logits[rows, last]
        return (at[rows, answer] - at[rows, distractor]).double()

    saved = {}

    def grab(i):
        def hook(mod, args):
            saved[i] = args[0].detach().clone()
        return hook

    module = (lambda b: b) if family == "resid_pre" else (lambda b: b.attn.c_proj)
    handles = [module(b).register_forward_pre_hook(grab(i)) for i, b in enumerate(blocks)]
    with torch.no_grad():
        model(**clean)
    for h in handles:
        h.remove()
    with torch.no_grad():
        baseline = metric(model(**corrupt).logits)
    heads = model.config.n_head
    d_head = model.config.n_embd // heads
    units = LENGTH if family == "resid_pre" else heads
    out = torch.zeros(len(blocks), units, dtype=torch.float64)
    for layer, block in enumerate(blocks):
        for u in range(units):
            def patch(mod, args, layer=layer, u=u):
                x = args[0].clone()
                if family == "resid_pre":
                    x[:, u] = saved[layer][:, u]
                else:
                    x[..., u * d_head:(u + 1) * d_head] = saved[layer][..., u * d_head:(u + 1) * d_head]
                return (x, *args[1:])

            handle = module(block).register_forward_pre_hook(patch)
            try:
                with torch.no_grad():
                    out[layer, u] = (metric(model(**corrupt).logits) - baseline).mean()
            finally:
                handle.remove()
    return out


@pytest.mark.parametrize("pad", [None, "right", "left"])
@pytest.mark.parametrize("kind", ["middle", "first"])
def test_sweep_equals_a_naive_loop_of_hooked_forwards(kind, pad):
    model = randomize(tiny_gpt2(n_layer=3, initializer_range=0.3))
    m = cp.wrap(model)
    clean, corrupt = _pair(kind, pad)
    ids = clean["input_ids"]
    answer = ids[torch.arange(3), _last_real(clean["attention_mask"])]
    distractor = answer % 99 + 1
    metric = cp.metrics.logit_diff(answer, distractor)
    for family, pattern in (("resid_pre", "resid_pre.*[pos=*]"), ("head_out", "head_out.*[head=*]")):
        want = _naive(model, clean, corrupt, answer, distractor, family)
        got = cp.activation_patching(m, clean, corrupt, pattern, metric, progress=False)
        got_values = torch.as_tensor(got.values).reshape(want.shape)
        assert want.abs().max() > 0.05  # effects far above float error (float32 logits of about 10: 1e-5 is rounding)
        torch.testing.assert_close(got_values, want, atol=1e-5, rtol=0, msg=lambda s: f"{family}: {s}")
        # one site per forward and no prefix reuse: the same numbers
        plain = cp.activation_patching(m, clean, corrupt, pattern, metric, progress=False, batch_size=3,
                                       reuse_prefix=False, skip_unchanged=False)
        torch.testing.assert_close(got_values, torch.as_tensor(plain.values).reshape(want.shape), atol=1e-5, rtol=0)
        if family == "resid_pre" and pad is None:
            # skipped sites are exactly those before the differing position (and layer 0 elsewhere but there)
            p = 1 if kind == "first" else LENGTH // 2
            skipped = torch.as_tensor(got.skipped).reshape(want.shape)
            assert skipped[:, :p].all() and not skipped[1:, p:].any() and skipped[0].sum() == LENGTH - 1


def _prefix(layers: int, rows: int, length: int) -> Prefix:
    empty = torch.zeros(rows, length, 1)
    return Prefix([empty] * layers, empty, True, [], length)


def test_least_cost_split_is_the_cheapest_contiguous_partition():
    """Exhaustive check of the dynamic programme against every contiguous split of a few sites."""
    import itertools

    layers, n_layers = [0, 1, 1, 4, 6, 7], 8
    for tokens, overhead, most in ((1, 8, 6), (8, 8, 6), (40, 8, 6), (2, 8, 2)):
        def cost(split):
            return sum((n_layers - layers[lo]) * (overhead + (hi - lo) * tokens) for lo, hi in split)

        best = None
        for cuts in itertools.product([0, 1], repeat=len(layers) - 1):
            bounds = [0] + [i + 1 for i, c in enumerate(cuts) if c] + [len(layers)]
            split = list(zip(bounds, bounds[1:]))
            if all(hi - lo <= most for lo, hi in split):
                best = cost(split) if best is None else min(best, cost(split))
        got = _least_cost_split(layers, n_layers, tokens, overhead, most)
        assert cost(got) == best and all(hi - lo <= most for lo, hi in got)
        assert [i for lo, hi in got for i in range(lo, hi)] == list(range(len(layers)))


def test_chunks_share_forwards_when_windows_are_small_and_respect_the_token_budget():
    from crosspatch.sites.catalog import Catalog  # noqa: F401  (the catalog comes from a wrapped model)

    m = cp.wrap(tiny_gpt2(n_layer=4))
    catalog = m.catalog
    sites = catalog.expand("resid_pre.*[pos=*]", {"pos": 8}).sites
    few = resume_chunks(sites, catalog, _prefix(4, 1, 8), len(sites), tokens_per_forward=256)
    many = resume_chunks(sites, catalog, _prefix(4, 64, 8), len(sites), tokens_per_forward=256)
    for chunks, rows in ((few, 1), (many, 64)):
        assert sorted(i for c, _ in chunks for i in c) == list(range(len(sites)))
        for members, resume in chunks:
            starts = [start_of(sites[i], catalog, 8, True) for i in members]
            # a batch starts at or before each member's layer and position
            assert all(s[1] >= resume.pos and s[0] >= resume.layer for s in starts)
            assert len(members) == 1 or len(members) * rows * (8 - resume.pos) <= 256
    # one prompt: the last positions' sites cost a few token rows each, far below a forward's overhead
    assert len(few) < len(sites) / 2
    assert any(len({start_of(sites[i], catalog, 8, True)[1] for i in members}) > 1 for members, _ in few)  # positions joined
    # 64 prompts x at least one position: every window is over 8 token rows and the budget allows few joins
    assert len(many) > len(few)
