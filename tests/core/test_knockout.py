"""Attention knockout: blocked edges get zero probability, the rest renormalised, checked against
hand-computed attention on tiny Llama-family models (grouped-query attention: 4 query heads on 2 key/value
heads), under causal, sliding-window and padding masks; and position groups in site selections."""

from __future__ import annotations

import json

import pytest
import torch

import crosspatch as cp
from crosspatch.engine.forward import Bound
from crosspatch.engine.interventions import Patch, Zero, from_dict
from crosspatch.engine.knockout import Knockout, KnockoutEdges, bind
from crosspatch.sites.selection import group_sites, take_group
from crosspatch.sites.site import SiteError

from conftest import randomize, tiny_llama

N = 8


def positions(*cols: int, n: int = N) -> torch.Tensor:
    mask = torch.zeros(n, dtype=torch.bool)
    mask[list(cols)] = True
    return mask


@pytest.fixture(scope="module")
def llama():
    return cp.wrap(randomize(tiny_llama()).double())


@pytest.fixture(scope="module")
def inputs(llama):
    torch.manual_seed(5)
    return llama.prepare(torch.randint(1, 100, (2, N)))


def test_blocking_edges_that_carry_no_attention_changes_nothing(llama, inputs):
    """Keys after their query are masked by the causal mask: blocking them is bit for bit the plain run (with
    the patterns computed the same way: reading them switches the attention to crosspatch's eager function)."""
    base = llama.run(inputs, capture=["resid_post.1", "attn_pattern.*"])
    future = Knockout(src=positions(5, 6, 7), dst=positions(0, 1, 2, 3, 4))
    run = llama.run(inputs, bind(llama, inputs, [future]), capture=["resid_post.1"])
    assert torch.equal(run.output, base.output)
    assert torch.equal(run.cache["resid_post.1"], base.cache["resid_post.1"])


def test_blocking_every_other_key_is_attending_to_itself(llama, inputs):
    """Position 6 sees only itself in layer 0: each query head's output there is the value of its key/value
    head at position 6 (no rotary on values), computed by hand through the block's own weights."""
    q = 6
    others = torch.ones(N, dtype=torch.bool)
    others[q] = False
    run = llama.run(inputs, bind(llama, inputs, [Knockout(others, positions(q), layers=0)]),
                    capture=["resid_pre.0", "attn_out.0", "attn_pattern.0"])
    block = llama.module.model.layers[0]
    attn = block.self_attn
    x = block.input_layernorm(run.cache["resid_pre.0"][:, q])
    d_head = attn.head_dim
    v = attn.v_proj(x).view(x.shape[0], -1, d_head)  # [rows, kv heads, d_head]
    groups = attn.num_key_value_groups
    z = v.repeat_interleave(groups, dim=1).reshape(x.shape[0], -1)  # query head h reads kv head h // groups
    expected = attn.o_proj(z)
    torch.testing.assert_close(run.cache["attn_out.0"][:, q], expected, rtol=0, atol=1e-12)
    pattern = run.cache["attn_pattern.0"]
    assert torch.equal(pattern[:, :, q, q], torch.ones_like(pattern[:, :, q, q]))
    base = llama.run(inputs, capture=["attn_out.0", "attn_pattern.0"])  # other queries untouched
    assert torch.equal(run.cache["attn_out.0"][:, :q], base.cache["attn_out.0"][:, :q])


def test_renormalises_the_kept_keys(llama, inputs):
    """One head, one blocked key: the kept probabilities are the old ones over their sum (softmax over the rest)."""
    base = llama.run(inputs, capture=["attn_pattern.1"]).cache["attn_pattern.1"]
    run = llama.run(inputs, bind(llama, inputs, [Knockout(positions(2), positions(5), layers=1, heads=3)]),
                    capture=["attn_pattern.1"])
    got = run.cache["attn_pattern.1"]
    old = base[:, 3, 5].clone()
    old[:, 2] = 0
    torch.testing.assert_close(got[:, 3, 5], old / old.sum(-1, keepdim=True), rtol=0, atol=1e-14)
    assert torch.equal(got[:, :3], base[:, :3])  # other heads keep theirs (layer 1 reads layer 0, unchanged)


def test_sliding_window_mask_is_respected():
    """In Mistral with a window of 3, keys further back carry no attention: blocking them changes nothing."""
    m = cp.wrap(randomize(tiny_llama("mistral", sliding_window=3)).double())
    torch.manual_seed(6)
    inp = m.prepare(torch.randint(1, 100, (2, N)))
    base = m.run(inp, capture=["attn_pattern.*"])
    far = Knockout(src=positions(0, 1, 2), dst=positions(5, 6, 7))  # 5 - 2 >= 3: outside every window
    assert torch.equal(m.run(inp, bind(m, inp, [far])).output, base.output)
    near = Knockout(src=positions(4), dst=positions(6))
    assert not torch.allclose(m.run(inp, bind(m, inp, [near])).output, base.output)


def test_padding_keys_stay_masked(llama):
    """Left padding: blocking the padding keys changes nothing."""
    torch.manual_seed(7)
    ids = torch.randint(1, 100, (2, N))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    inp = llama.prepare({"input_ids": ids, "attention_mask": mask})
    pads = torch.zeros(2, N, dtype=torch.bool)
    pads[1, :2] = True
    later = torch.zeros(2, N, dtype=torch.bool)
    later[:, 2:] = True
    plain = llama.run(inp, capture=["attn_pattern.*"]).output
    assert torch.equal(llama.run(inp, bind(llama, inp, [Knockout(pads, later)])).output, plain)


def test_combines_with_patches_and_binds_rows(llama, inputs):
    """A knockout on row 1 only, with a zero ablation in the same forward: row 0 sees the ablation alone."""
    ko = Knockout(positions(0, 1, 2), positions(7), rows=slice(1, 2))
    zero = ("mlp_out.0[pos=3]", Zero())
    both = llama.run(inputs, bind(llama, inputs, [ko, zero])).output
    same = ["attn_pattern.*"]  # the same attention function as the knockout's runs
    only_zero = llama.run(inputs, {"mlp_out.0[pos=3]": Zero()}, capture=same).output
    assert torch.equal(both[0], only_zero[0])
    assert not torch.allclose(both[1], only_zero[1])
    clean = llama.run(inputs, capture=["resid_pre.1"]).cache
    patched = llama.run(inputs, bind(llama, inputs, [ko, ("resid_pre.1[pos=7]", Patch(clean))])).output
    assert torch.equal(patched[0], llama.run(inputs, capture=same).output[0])


def test_a_query_with_nothing_left_is_refused(llama, inputs):
    everything = torch.ones(N, dtype=torch.bool)
    with pytest.raises(SiteError, match="all its attention blocked"):
        llama.run(inputs, bind(llama, inputs, [Knockout(everything, positions(4), layers=0)]))


def test_unknown_group_and_bad_site_are_named(llama, inputs):
    with pytest.raises(SiteError, match="position group 'image'"):
        bind(llama, inputs, [Knockout("image", positions(4))])
    with pytest.raises(SiteError, match="not a writable per-layer attention pattern|no site family"):
        bind(llama, inputs, [Knockout(positions(1), positions(4), family="resid_pre.0")])
    with pytest.raises(SiteError, match="selected by head"):
        llama.run(inputs, [Bound(cp.Site.parse("attn_pattern.0[pos=3]"), KnockoutEdges(positions(1), positions(3)))])


def test_round_trips_to_dict():
    edges = KnockoutEdges(positions(1, 2), positions(5))
    back = from_dict(json.loads(json.dumps(edges.to_dict())))
    assert isinstance(back, KnockoutEdges)
    assert torch.equal(back.src, edges.src) and torch.equal(back.dst, edges.dst)


# Position groups in site selections (crosspatch.sites.selection) ----------------------------------------------

def test_group_sites_split_rows_only_where_columns_differ():
    groups = {"q": torch.tensor([[0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 1, 1]]).bool(),
              "k": torch.tensor([[1, 0, 0, 0]] * 3).bool()}
    pairs = group_sites("attn_pattern.1[head=2,pos=q,key_pos=k]", groups)
    assert [(str(s), r) for s, r in pairs] == [
        ("attn_pattern.1[head=2,pos={1,2},key_pos={0}]", slice(0, 2)),
        ("attn_pattern.1[head=2,pos={2,3},key_pos={0}]", slice(2, 3)),
    ]
    (same,) = group_sites("resid_pre.*[pos=k]", groups)
    assert str(same[0]) == "resid_pre.*[pos={0}]" and same[1] is None
    assert group_sites("resid_pre.1[pos=last]", groups) == [(cp.Site.parse("resid_pre.1[pos=last]"), None)]
    with pytest.raises(SiteError, match="no position group 'image'.*carry k, q"):
        group_sites("resid_pre.1[pos=image]", groups)
    with pytest.raises(SiteError, match="holds no position in rows \\[1\\]"):
        group_sites("resid_pre.1[pos=e]", {"e": torch.tensor([[1, 0], [0, 0]]).bool()})


def test_take_group_reads_each_rows_columns():
    x = torch.arange(24.0).view(2, 4, 3)
    mask = torch.tensor([[0, 1, 1, 0], [1, 0, 0, 1]]).bool()
    assert torch.equal(take_group(x, mask), torch.stack([x[0, 1:3], x[1, [0, 3]]]))
    with pytest.raises(SiteError, match="row by row"):
        take_group(x, torch.tensor([[0, 1, 1, 0], [1, 0, 0, 0]]).bool())


def test_a_patch_on_a_group_that_differs_by_row_is_refused(llama, inputs):
    grouped = {**inputs, "group.g": torch.tensor([[0, 1] + [0] * (N - 2), [0, 0, 1] + [0] * (N - 3)]).bool()}
    clean = llama.run(inputs, capture=["resid_pre.1"]).cache
    with pytest.raises(SiteError, match="bound row by row"):
        bind(llama, grouped, {"resid_pre.1[pos=g]": Patch(clean)})
    bounds = bind(llama, grouped, {"resid_pre.1[pos=g]": Zero()})
    assert [(b.site.selection["pos"], b.rows) for b in bounds] == [((1,), slice(0, 1)), ((2,), slice(1, 2))]
