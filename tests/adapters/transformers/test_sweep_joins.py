"""Rows joining a resumed run part-way (``Resume.joins``): a one-prompt sweep's later sites enter its forward at
their own block, holding the clean residual there, instead of recomputing the blocks before it. The joined run
equals runs resumed at each site's own block, and a sweep planned with joins equals a loop of hand-hooked
forwards and the same sweep without joins."""

from __future__ import annotations

import importlib

import pytest
import torch

import crosspatch as cp
from conftest import padded_prompts, randomize, tiny_gpt2
from crosspatch.engine.adapter import repeat_rows
from crosspatch.engine.forward import Bound, execute
from crosspatch.engine.interventions import Add
from crosspatch.engine.resume import Resume, resume_chunks, start_of
from crosspatch.sites.site import Site
from test_sweep_equivalence import LENGTH, _naive, _pair

AP = importlib.import_module("crosspatch.methods.activation_patching")  # the module (the package exports the function)


def _one_prompt(kind: str):
    clean, corrupt = _pair(kind, None)
    return {k: v[:1] for k, v in clean.items()}, {k: v[:1] for k, v in corrupt.items()}


def test_joined_rows_equal_runs_resumed_at_their_own_block():
    model = randomize(tiny_gpt2(n_layer=4, initializer_range=0.3))
    m = cp.wrap(model)
    inputs = m.prepare(padded_prompts(2, rows=1, length=LENGTH))
    prefix = execute(m.module, m.adapter, m.catalog, inputs, keep_prefix=True).prefix
    pos = 4
    # rows: one from block 1, two joining at block 1, one at block 2, two at block 3; each gets its own shift
    layers = [1, 1, 1, 2, 3, 3]
    g = torch.Generator().manual_seed(1)
    shifts = [torch.randn(64, generator=g) for _ in layers]
    sites = [Site.parse(f"resid_pre.{l}[pos={pos + j % 3}]") for j, l in enumerate(layers)]
    bounds = [Bound(s, Add(v), slice(j, j + 1)) for j, (s, v) in enumerate(zip(sites, shifts))]
    joins = (("resid_pre.1", 2), ("resid_pre.2", 1), ("resid_pre.3", 2))
    joined = execute(m.module, m.adapter, m.catalog, repeat_rows(inputs, len(layers)), bounds,
                     resume=Resume(prefix, 1, pos, joins=joins)).output
    assert joined.shape[0] == len(layers)
    for j, (layer, site, shift) in enumerate(zip(layers, sites, shifts)):
        alone = execute(m.module, m.adapter, m.catalog, inputs, [Bound(site, Add(shift))], resume=Resume(prefix, layer, pos)).output
        whole = execute(m.module, m.adapter, m.catalog, inputs, [Bound(site, Add(shift))]).output
        torch.testing.assert_close(joined[j], alone[0], atol=2e-5, rtol=0)
        torch.testing.assert_close(joined[j], whole[0], atol=2e-5, rtol=0)
        assert (joined[j] - prefix.output[0]).abs().max() > 1e-2  # the shift shows: each row was patched


def test_joins_are_refused_where_they_cannot_hold():
    model = tiny_gpt2(n_layer=3)
    m = cp.wrap(model)
    two = m.prepare(padded_prompts(2, rows=2, length=LENGTH))
    prefix2 = execute(m.module, m.adapter, m.catalog, two, keep_prefix=True).prefix
    with pytest.raises(ValueError, match="one-prompt prefix"):
        Resume(prefix2, 1, 2, joins=(("resid_pre.2", 1),))
    one = {k: v[:1] for k, v in two.items()}
    prefix = execute(m.module, m.adapter, m.catalog, one, keep_prefix=True).prefix
    with pytest.raises(ValueError, match="rows join at a block"):
        Resume(prefix, 2, 2, joins=(("resid_pre.1", 1),))  # before the start
    with pytest.raises(ValueError, match="3 rows of inputs, got 2"):
        execute(m.module, m.adapter, m.catalog, repeat_rows(one, 2), resume=Resume(prefix, 1, 2, joins=(("resid_pre.2", 2),)))


@pytest.mark.parametrize("kind", ["middle", "first"])
def test_one_prompt_sweep_with_joins_equals_hooked_forwards(kind, monkeypatch):
    model = randomize(tiny_gpt2(n_layer=4, initializer_range=0.3))
    m = cp.wrap(model)
    clean, corrupt = _one_prompt(kind)
    answer = clean["input_ids"][:, -1]
    distractor = answer % 99 + 1
    metric = cp.metrics.logit_diff(answer, distractor)
    planned = []

    def spy(*args, **kwargs):
        chunks = resume_chunks(*args, **kwargs)
        planned.extend(r for _, r in chunks if r is not None)
        return chunks

    monkeypatch.setattr(AP, "resume_chunks", spy)
    for family, pattern in (("resid_pre", "resid_pre.*[pos=*]"), ("head_out", "head_out.*[head=*]")):
        planned.clear()
        want = _naive(model, clean, corrupt, answer, distractor, family)
        got = cp.activation_patching(m, clean, corrupt, pattern, metric, progress=False)
        assert any(r.joins for r in planned), "no batch had rows joining part-way"
        got_values = torch.as_tensor(got.values).reshape(want.shape)
        assert want.abs().max() > 0.05
        torch.testing.assert_close(got_values, want, atol=1e-5, rtol=0, msg=lambda s: f"{family}: {s}")
        monkeypatch.setattr(AP, "JOIN_ROWS", False)
        planned.clear()
        plain = cp.activation_patching(m, clean, corrupt, pattern, metric, progress=False)
        assert not any(r.joins for r in planned)
        monkeypatch.setattr(AP, "JOIN_ROWS", True)
        torch.testing.assert_close(got_values, torch.as_tensor(plain.values).reshape(want.shape), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind,pad,row", [("middle", "left", 1), ("first", "right", 0), ("zero", None, 0)])
def test_one_padded_prompt_or_a_pair_differing_at_position_0_joins_rows_exactly(kind, pad, row):
    """A single prompt padded on either side (its one-row mask broadcasts over the joined rows), and a pair that
    differs at position 0 (every batch resumes at position 0): equal to hand-hooked forwards."""
    model = randomize(tiny_gpt2(n_layer=4, initializer_range=0.3))
    m = cp.wrap(model)
    clean, corrupt = _pair("first" if kind == "zero" else kind, pad)
    clean, corrupt = ({k: v[row : row + 1] for k, v in x.items()} for x in (clean, corrupt))
    if kind == "zero":
        corrupt["input_ids"][:, 0] = corrupt["input_ids"][:, 0] % 99 + 1
    assert pad is None or not clean["attention_mask"].all()  # the prompt is padded
    mask = clean["attention_mask"]
    answer = clean["input_ids"][0, (mask[0] * torch.arange(LENGTH)).argmax()].reshape(1)
    metric = cp.metrics.logit_diff(answer, answer % 99 + 1)
    want = _naive(model, clean, corrupt, answer, answer % 99 + 1, "resid_pre")
    got = cp.activation_patching(m, clean, corrupt, "resid_pre.*[pos=*]", metric, progress=False)
    assert want.abs().max() > 0.05
    torch.testing.assert_close(torch.as_tensor(got.values).reshape(want.shape), want, atol=1e-5, rtol=0)


def test_join_plan_covers_every_site_once_and_costs_no_recomputed_blocks():
    m = cp.wrap(tiny_gpt2(n_layer=4))
    catalog = m.catalog
    sites = catalog.expand("resid_pre.*[pos=*]", {"pos": 8}).sites
    from test_sweep_equivalence import _prefix

    chunks = resume_chunks(sites, catalog, _prefix(4, 1, 8), len(sites), tokens_per_forward=256, join_at="resid_pre")
    assert sorted(i for c, _ in chunks for i in c) == list(range(len(sites)))
    for members, resume in chunks:
        layers = [start_of(sites[i], catalog, 8, True)[0] for i in members]
        assert layers == sorted(layers) and resume.layer == layers[0]
        # every member but the first joins at its own block: rows appended in the members' order
        assert [int(k.split(".")[1]) for k, c in resume.joins for _ in range(c)] == layers[1:]
    # with several prompts rows cannot join (the batch's attention mask is built for the rows it starts with)
    many = resume_chunks(sites, catalog, _prefix(4, 3, 8), len(sites), tokens_per_forward=256, join_at="resid_pre")
    assert not any(r.joins for _, r in many)
