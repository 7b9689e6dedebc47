"""Prefix reuse in the engine, on a position-wise toy model whose adapter resumes by hand."""

import pytest
import torch
from conftest import ToyNet, toy_adapter

import crosspatch as cp
from crosspatch.engine.adapter import repeat_rows
from crosspatch.engine.forward import Bound, execute
from crosspatch.engine.resume import Prefix, Resume, resume_chunks, start_of, windowed
from crosspatch.sites.site import Site, SiteError, Span


def resumable_toy():
    """The toy adapter, able to start at any layer and position (every position is independent)."""
    base = toy_adapter()

    class ResumableToy(type(base)):
        def can_resume(self, model):
            return True

        def forward_keeping_prefix(self, model, inputs):
            residuals = []
            x = inputs["x"]
            for layer in model.layers:
                residuals.append(x)
                x = torch.relu(layer(x))
            out = model(inputs["x"])
            return out, Prefix(residuals, out, causal=True, keys_values=[], length=x.shape[1])

        def resume(self, model, inputs, run):
            times = inputs["x"].shape[0] // run.prefix.rows
            x = run.prefix.residuals[run.layer][:, run.pos :].repeat(times, 1, 1)
            if run.own_inputs:
                x = inputs["x"][:, run.pos :]
            for layer in model.layers[run.layer :]:
                x = torch.relu(layer(x))
            head = run.prefix.output[:, : run.pos].repeat(times, 1, 1)
            return torch.cat([head, model.head(x)], dim=1)

    return ResumableToy()


@pytest.fixture
def toy():
    model, adapter = ToyNet(), resumable_toy()
    catalog = adapter.catalog(model)
    g = torch.Generator().manual_seed(0)
    base_in = {"x": torch.randn(3, 6, 4, generator=g)}
    source_in = {"x": torch.randn(3, 6, 4, generator=g)}
    return model, adapter, catalog, base_in, source_in


def run_both(toy, bounds, layer, pos, times=2):
    model, adapter, catalog, base_in, _ = toy
    prefix = execute(model, adapter, catalog, base_in, keep_prefix=True).prefix
    inputs = repeat_rows(base_in, times)
    full = execute(model, adapter, catalog, inputs, bounds).output
    resumed = execute(model, adapter, catalog, inputs, bounds, resume=Resume(prefix, layer, pos)).output
    return full, resumed


@pytest.mark.parametrize("site", ["hidden_in.1[pos=4]", "hidden.0[pos=3,dim=1]", "hidden.1[pos=2:5]", "hidden.1[pos={3,5}]"])
@pytest.mark.parametrize("intervention", ["patch", "zero", "scale", "resample"])
def test_resumed_run_equals_the_full_run(toy, site, intervention):
    model, adapter, catalog, base_in, source_in = toy
    source = execute(model, adapter, catalog, source_in, capture=[Site.parse(site).key]).cache
    made = {
        "patch": cp.Patch(source), "zero": cp.Zero(), "scale": cp.Scale(3.0), "resample": cp.Resample(source, seed=1),
    }[intervention]
    bounds = [Bound(Site.parse(site), made, slice(3, 6))]  # the second copy of the rows only
    layer = Site.parse(site).layer
    for pos in (0, 2):
        full, resumed = run_both(toy, bounds, layer, pos)
        torch.testing.assert_close(resumed, full, rtol=0, atol=1e-6)
        assert not torch.equal(full[3:], full[:3])  # the intervention changed the patched rows


def test_resume_refuses_what_it_cannot_reach(toy):
    model, adapter, catalog, base_in, source_in = toy
    prefix = execute(model, adapter, catalog, base_in, keep_prefix=True).prefix
    with pytest.raises(SiteError, match="before block 1"):
        execute(model, adapter, catalog, base_in, [Bound(Site.parse("hidden.0"), cp.Zero())], resume=Resume(prefix, 1))
    with pytest.raises(SiteError, match="touches position 1, before the resumed run's first position 2"):
        execute(model, adapter, catalog, base_in, [Bound(Site.parse("hidden.1[pos=1]"), cp.Zero())], resume=Resume(prefix, 1, 2))
    with pytest.raises(SiteError, match="covers every position"):
        execute(model, adapter, catalog, base_in, [Bound(Site.parse("hidden.1"), cp.Zero())], resume=Resume(prefix, 1, 2))
    with pytest.raises(SiteError, match="reads other positions"):
        execute(model, adapter, catalog, base_in, [Bound(Site.parse("hidden.1[pos=3]"), cp.Noise())], resume=Resume(prefix, 1, 2))
    with pytest.raises(SiteError, match="capture hidden.0: computed before block 1"):
        execute(model, adapter, catalog, base_in, capture=["hidden.0"], resume=Resume(prefix, 1))
    with pytest.raises(ValueError, match="cannot keep a prefix or take gradients"):
        execute(model, adapter, catalog, base_in, grad=True, resume=Resume(prefix, 1))
    with pytest.raises(ValueError, match="own inputs starts at the embeddings"):
        Resume(prefix, 1, 2, own_inputs=True)
    with pytest.raises(ValueError, match="resume position 9"):
        Resume(prefix, 0, 9)
    acausal = Prefix(prefix.residuals, prefix.output, causal=False, keys_values=[], length=6)
    with pytest.raises(ValueError, match="not causal"):
        Resume(acausal, 0, 2)


def test_a_resumed_run_captures_the_positions_it_computes(toy):
    model, adapter, catalog, base_in, _ = toy
    prefix = execute(model, adapter, catalog, base_in, keep_prefix=True).prefix
    inputs = repeat_rows(base_in, 2)
    full = execute(model, adapter, catalog, inputs, capture=["hidden.1", "out"]).cache
    resumed = execute(model, adapter, catalog, inputs, capture=["hidden.1", "out"], resume=Resume(prefix, 1, 2)).cache
    for key in ("hidden.1", "out"):
        assert resumed[key].shape[1] == 4
        torch.testing.assert_close(resumed[key], full[key][:, 2:], rtol=0, atol=1e-6)


def test_mean_is_position_local_only_when_it_keeps_positions():
    assert cp.Mean(None).position_local
    assert not cp.Mean(None, over=("batch", "pos")).position_local
    assert cp.Patch().position_local and not cp.Noise().position_local


def test_windowed_shifts_positions_and_start_of_reads_them(toy):
    _, _, catalog, _, _ = toy
    assert windowed(Site.parse("hidden.1[pos=4,dim=2]"), 3, 6) == Site.parse("hidden.1[pos=1,dim=2]")
    assert windowed(Site.parse("hidden.1[pos=-1]"), 3, 6) == Site.parse("hidden.1[pos=2]")
    assert windowed(Site.parse("hidden.1[pos={3,5}]"), 3, 6).selection["pos"] == (0, 2)
    assert windowed(Site.parse("hidden.1[pos=4:]"), 3, 6).selection["pos"] == Span(1, None)
    assert windowed(Site.parse("hidden.1"), 0, 6) == Site.parse("hidden.1")
    with pytest.raises(SiteError, match="covers every position"):
        windowed(Site.parse("hidden.1"), 3, 6)
    assert start_of(Site.parse("hidden.1[pos={5,2}]"), catalog, 6, causal=True) == (1, 2)
    assert start_of(Site.parse("hidden.1[pos=4]"), catalog, 6, causal=False) == (1, 0)
    assert start_of(Site.parse("out[pos=4]"), catalog, 6, causal=True) is None


def test_chunks_cover_every_site_once_and_resume_where_they_may(toy):
    model, adapter, catalog, base_in, _ = toy
    prefix = execute(model, adapter, catalog, base_in, keep_prefix=True).prefix
    sites = catalog.expand(["hidden.*[pos=*]", "out[pos=*]"], {"pos": 6}).sites
    chunks = resume_chunks(sites, catalog, prefix, per_forward=4)
    members = sorted(i for chunk, _ in chunks for i in chunk)
    assert members == list(range(len(sites)))
    for chunk, resume in chunks:
        assert len(chunk) <= 4
        starts = [start_of(sites[i], catalog, 6, True) for i in chunk]
        if resume is None:
            assert all(s is None for s in starts)
        else:
            assert all(s[1] >= resume.pos and s[0] >= resume.layer for s in starts)
    assert sorted(i for chunk, _ in resume_chunks(sites, catalog, None, 5) for i in chunk) == members


def test_sweep_with_reuse_equals_sweep_without(toy):
    model, adapter, catalog, base_in, source_in = toy
    from crosspatch.engine.model import WrappedModel

    m = WrappedModel(model, adapter)
    metric = lambda out, ctx: out[:, -1, 0] - out[:, -1, 1]  # noqa: E731
    kwargs = dict(sites="hidden.*[pos=*,dim=*]", metric=metric, progress=False, batch_size=12)
    with_reuse = cp.activation_patching(m, base_in, source_in, **kwargs)
    without = cp.activation_patching(m, base_in, source_in, reuse_prefix=False, **kwargs)
    assert with_reuse.metadata["reuse_prefix"] and not without.metadata["reuse_prefix"]
    assert abs(with_reuse.values).max() > 1e-3
    assert abs(with_reuse.values - without.values).max() < 1e-6


def test_agreeing_positions_compare_position_by_position():
    from crosspatch.methods.shared_prefix import agreeing_positions

    ids = torch.arange(12).reshape(2, 6)
    other = ids.clone()
    other[1, 4] = 99
    mask = torch.ones(2, 6, dtype=torch.long)
    assert agreeing_positions({"input_ids": ids, "attention_mask": mask}, {"input_ids": other, "attention_mask": mask}, 6) == 4
    assert agreeing_positions({"input_ids": ids}, {"input_ids": ids.clone()}, 6) == 6
    left = mask.clone()
    left[0, 0] = 0  # a mask that differs at the first position
    assert agreeing_positions({"input_ids": ids, "attention_mask": mask}, {"input_ids": ids, "attention_mask": left}, 6) == 0
    # anything not laid out by position must be equal
    assert agreeing_positions({"input_ids": ids, "scale": torch.ones(2)}, {"input_ids": ids, "scale": torch.zeros(2)}, 6) == 0
    assert agreeing_positions({"input_ids": ids, "flag": True}, {"input_ids": ids, "flag": False}, 6) == 0
    assert agreeing_positions({"input_ids": ids}, {"input_ids": ids, "attention_mask": mask}, 6) == 0


@pytest.mark.parametrize("first_difference", [0, 3, 6])
def test_capture_sharing_a_prefix_equals_a_full_run(toy, first_difference):
    from crosspatch.methods.shared_prefix import capture_sharing_prefix
    from crosspatch.engine.model import WrappedModel

    model, adapter, catalog, base_in, source_in = toy
    m = WrappedModel(model, adapter)
    other = {"x": base_in["x"].clone()}
    other["x"][:, first_difference:] = source_in["x"][:, first_difference:]
    keys = ["hidden.0", "hidden.1", "out"]
    base = execute(model, adapter, catalog, repeat_rows(base_in, 2), capture=keys, keep_prefix=True)
    first = (repeat_rows(base_in, 2), base.prefix, {k: base.cache[k] for k in keys})  # more rows than the run
    output, values, computed_from = capture_sharing_prefix(m, other, keys, None, first)
    full = execute(model, adapter, catalog, other, capture=keys)
    assert computed_from == first_difference
    torch.testing.assert_close(output, full.output, rtol=0, atol=1e-6)
    for key in keys:
        assert values[key].shape == full.cache[key].shape
        torch.testing.assert_close(values[key], full.cache[key], rtol=0, atol=1e-6)
    # without a kept run it is a whole run
    assert capture_sharing_prefix(m, other, keys, None, None)[2] == 0
