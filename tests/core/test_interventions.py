"""Each intervention against its closed form.

The oracle: run the toy net with the intervention at a site and capture that same site; the
capture holds the activation after the intervention, which must equal the closed form applied
to the clean activation (captured separately), and the output must equal the toy's remaining
forward applied to it.
"""

from __future__ import annotations

import io

import pytest
import torch

import crosspatch as cp

close = torch.testing.assert_close


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.fixture
def x():
    return randn(3, 5, 4, seed=21)


@pytest.fixture
def ref():
    return randn(6, 5, 4, seed=22)


def after(toy, x, site, iv, key=None):
    """The activation at the site's key after ``iv``, and the clean one."""
    key = key or cp.Site.parse(site).key
    new = toy.run(x, {site: iv}, capture=key).cache[key]
    clean = toy.capture(x, key)[key]
    return new, clean


def finish_from_hidden0(net, h0):
    """The toy forward from hidden.0 (pre-ReLU) on."""
    with torch.no_grad():
        return net.head(torch.relu(net.layers[1](torch.relu(h0))))


# ---------------------------------------------------------------- Patch


def test_patch_closed_form(toy, x, ref):
    src = toy.capture(ref[:3], "hidden.0")
    new, clean = after(toy, x, "hidden.0[pos={1,3}]", cp.Patch(src))
    want = clean.clone()
    want[:, [1, 3]] = src["hidden.0"][:, [1, 3]]
    assert torch.equal(new, want)
    close(toy.run(x, {"hidden.0[pos={1,3}]": cp.Patch(src)}).output, finish_from_hidden0(toy.module, want))


# ---------------------------------------------------------------- Zero, Scale


def test_zero_closed_form(toy, x):
    new, clean = after(toy, x, "hidden.0[dim=2]", cp.Zero())
    want = clean.clone()
    want[:, :, 2] = 0
    assert torch.equal(new, want)
    close(toy.run(x, {"hidden.0[dim=2]": cp.Zero()}).output, finish_from_hidden0(toy.module, want))


@pytest.mark.parametrize("factor", [0.0, -1.5, 2.0])
def test_scale_closed_form(toy, x, factor):
    new, clean = after(toy, x, "hidden.0[pos=0:2]", cp.Scale(factor))
    want = clean.clone()
    want[:, 0:2] *= factor
    close(new, want)


def test_set_closed_form(toy, x):
    value = torch.tensor([1.5, -1.0, 0.0, 2.0])
    new, clean = after(toy, x, "hidden.0[pos=2,dim=1:3]", cp.Set(value))
    want = clean.clone()
    want[:, 2, 1:3] = value[1:3]  # the value is laid out like the site and selected with it
    close(new, want)
    scalar, _ = after(toy, x, "hidden.1[pos=0]", cp.Set(0.25))
    assert torch.all(scalar[:, 0] == 0.25)


def test_scale_default_factor_is_zero_ablation(toy, x):
    assert torch.equal(toy.run(x, {"hidden.1": cp.Scale()}).output, toy.run(x, {"hidden.1": cp.Zero()}).output)


# ---------------------------------------------------------------- Mean


def test_mean_over_batch_closed_form(toy, x, ref):
    cache = toy.capture(ref, "hidden.0")
    new, clean = after(toy, x, "hidden.0[pos=1]", cp.Mean(cache))
    want = clean.clone()
    want[:, 1] = cache["hidden.0"][:, 1].mean(0)  # the reference's mean, broadcast to every target row
    close(new, want)
    # the reference given as inputs (run inside the engine) gives the same
    close(toy.run(x, {"hidden.0[pos=1]": cp.Mean(ref)}).output, toy.run(x, {"hidden.0[pos=1]": cp.Mean(cache)}).output)


def test_mean_over_batch_and_pos_closed_form(toy, x, ref):
    cache = toy.capture(ref, "hidden.0")
    new, clean = after(toy, x, "hidden.0[pos={0,4}]", cp.Mean(cache, over=("batch", "pos")))
    want = clean.clone()
    want[:, [0, 4]] = cache["hidden.0"].mean((0, 1))
    close(new, want)


def test_mean_over_batch_and_dim_closed_form(toy, x, ref):
    cache = toy.capture(ref, "hidden.0")
    new, clean = after(toy, x, "hidden.0[pos=2]", cp.Mean(cache, over=("batch", "dim")))
    want = clean.clone()
    want[:, 2] = cache["hidden.0"][:, 2].mean()
    close(new, want)


def test_mean_of_the_targets_own_batch_is_the_batch_mean(toy, x):
    new, clean = after(toy, x, "hidden.1", cp.Mean(x))
    close(new, clean.mean(0, keepdim=True).expand_as(clean))


def test_mean_unknown_axis_raises(toy, x, ref):
    with pytest.raises(cp.SiteError, match=r"cannot average over \['head'\]; axes are \('batch', 'pos', 'dim'\)"):
        toy.run(x, {"hidden.0": cp.Mean(ref, over=("head",))})


def test_mean_over_pos_only_is_a_per_row_mean(toy, x):
    cache = toy.capture(x, "hidden.0")
    try:
        new, clean = after(toy, x, "hidden.0", cp.Mean(cache, over=("pos",)))
    except cp.SiteError:
        return  # a clear refusal ("over must include batch") would also be a fix
    close(new, clean.mean(1, keepdim=True).expand_as(clean))


# ---------------------------------------------------------------- Resample


def test_resample_closed_form_and_rows_come_from_source(toy, x, ref):
    cache = toy.capture(ref, "hidden.0")
    new, clean = after(toy, x, "hidden.0[pos=2]", cp.Resample(cache, seed=5))
    picks = torch.randint(6, (3,), generator=torch.Generator().manual_seed(5))
    want = clean.clone()
    want[:, 2] = cache["hidden.0"][picks, 2]
    assert torch.equal(new, want)
    for row in new[:, 2]:
        assert any(torch.equal(row, s) for s in cache["hidden.0"][:, 2])


def test_resample_is_deterministic_per_seed(toy, x, ref):
    cache = toy.capture(ref, "hidden.0")
    a = toy.run(x, {"hidden.0[pos=2]": cp.Resample(cache, seed=7)}).output
    b = toy.run(x, {"hidden.0[pos=2]": cp.Resample(cache, seed=7)}).output
    assert torch.equal(a, b)
    # the same from source inputs
    assert torch.equal(a, toy.run(x, {"hidden.0[pos=2]": cp.Resample(ref, seed=7)}).output)


def test_resample_seeds_change_the_draw(toy, ref):
    big = randn(200, 5, 4, seed=23)
    cache = toy.capture(ref, "hidden.0")
    a, _ = after(toy, big, "hidden.0", cp.Resample(cache, seed=0))
    b, _ = after(toy, big, "hidden.0", cp.Resample(cache, seed=1))
    assert not torch.equal(a, b)
    # each target row is a whole source row, drawn roughly uniformly
    src = cache["hidden.0"].flatten(1)
    which = [int((src == row).all(1).nonzero()[0]) for row in a.flatten(1)]
    counts = torch.bincount(torch.tensor(which), minlength=6)
    assert counts.min() > 15  # expectation 33 each


# ---------------------------------------------------------------- Noise


def test_noise_closed_form_with_given_std(toy, x):
    new, clean = after(toy, x, "hidden.0[pos=1]", cp.Noise(scale=2.0, std=0.5, seed=3))
    noise = torch.randn((3, 1, 4), generator=torch.Generator().manual_seed(3))
    want = clean.clone()
    want[:, 1:2] += noise * (2.0 * 0.5)
    close(new, want)


def test_noise_default_std_is_the_activations_std(toy, x):
    new, clean = after(toy, x, "hidden.0[pos=1]", cp.Noise(seed=3))  # scale 3, std of the full activation
    noise = torch.randn((3, 1, 4), generator=torch.Generator().manual_seed(3))
    want = clean.clone()
    want[:, 1:2] += noise * (3.0 * clean.std())
    close(new, want)


def test_noise_is_seeded(toy, x):
    a = toy.run(x, {"hidden.0": cp.Noise(seed=9)}).output
    assert torch.equal(a, toy.run(x, {"hidden.0": cp.Noise(seed=9)}).output)
    assert not torch.equal(a, toy.run(x, {"hidden.0": cp.Noise(seed=10)}).output)


@pytest.mark.parametrize("scale, std", [(0.5, 2.0), (3.0, None), (1.0, None)])
def test_noise_statistics_on_a_big_tensor(toy, scale, std):
    big = randn(512, 32, 4, seed=24)  # 65536 entries
    new, clean = after(toy, big, "hidden.0", cp.Noise(scale=scale, std=std, seed=0))
    added = (new - clean).double()
    sigma = scale * (std if std is not None else clean.double().std().item())
    assert abs(added.mean().item()) < 0.02 * sigma
    assert added.std().item() == pytest.approx(sigma, rel=0.02)
    # roughly Gaussian: about 68% within one sigma
    assert (added.abs() < sigma).double().mean().item() == pytest.approx(0.6827, abs=0.01)


# ---------------------------------------------------------------- Add


def test_add_vector_broadcasts_along_pos(toy, x):
    vec = torch.tensor([1.0, -2.0, 0.0, 3.0])
    new, clean = after(toy, x, "hidden.0", cp.Add(vec, alpha=0.5))
    close(new, clean + 0.5 * vec)


def test_add_selects_the_vector_like_the_activation(toy, x):
    per_pos = randn(5, 4, seed=25)  # a vector for every position
    new, clean = after(toy, x, "hidden.0[pos={1,3},dim=2:4]", cp.Add(per_pos, alpha=-2.0))
    want = clean.clone()
    want[:, [1, 3], 2:4] += -2.0 * per_pos[[1, 3], 2:4]
    close(new, want)


def test_add_accepts_a_list_and_a_single_dim_vector(toy, x):
    new, clean = after(toy, x, "hidden.0[dim=1]", cp.Add([0.0, 7.0, 0.0, 0.0]))
    want = clean.clone()
    want[:, :, 1] += 7.0
    close(new, want)


def test_add_wrong_shape_raises(toy, x):
    with pytest.raises(cp.SiteError, match=r"Add.vector has shape \(3,\).*axes \(pos, dim\) = \(5, 4\)"):
        toy.run(x, {"hidden.0": cp.Add(torch.ones(3))})


# ---------------------------------------------------------------- ProjectOut


def projector(basis: torch.Tensor) -> torch.Tensor:
    b = basis.double().reshape(-1, basis.shape[-1])
    return b.T @ torch.linalg.inv(b @ b.T) @ b  # orthogonal projector onto the row span


def test_project_out_closed_form_and_orthogonal_to_basis(toy, x):
    toy.module.double()
    xd = x.double()
    basis = randn(2, 4, seed=26, dtype=torch.float64)
    new, clean = after(toy, xd, "hidden.0", cp.ProjectOut(basis))
    close(new, clean - clean @ projector(basis))
    close(new @ basis.T, torch.zeros(3, 5, 2, dtype=torch.float64), atol=1e-12, rtol=0)
    # the part orthogonal to the basis is kept
    close(new @ projector(basis), torch.zeros_like(new), atol=1e-12, rtol=0)


def test_project_out_is_idempotent(toy, x):
    basis = randn(2, 4, seed=27)
    once = toy.run(x, {"hidden.0": cp.ProjectOut(basis)}, capture="hidden.0")
    twice = toy.run(x, [("hidden.0", cp.ProjectOut(basis)), ("hidden.0", cp.ProjectOut(basis))], capture="hidden.0")
    close(twice.cache["hidden.0"], once.cache["hidden.0"])
    close(twice.output, once.output)


def test_project_out_one_direction_and_positions(toy, x):
    v = torch.tensor([1.0, 1.0, 0.0, 0.0])
    new, clean = after(toy, x, "hidden.0[pos=2]", cp.ProjectOut(v))
    want = clean.clone()
    want[:, 2] -= (clean[:, 2] @ v)[:, None] * v / 2
    close(new, want)
    assert torch.equal(new[:, [0, 1, 3, 4]], clean[:, [0, 1, 3, 4]])


def test_project_out_rejects_selecting_the_last_axis(toy, x):
    with pytest.raises(cp.SiteError, match="acts on the whole 'dim' axis; do not select it"):
        toy.run(x, {"hidden.0[dim=1]": cp.ProjectOut(torch.ones(4))})
    with pytest.raises(cp.SiteError, match="do not select it"):
        toy.run(x, {"hidden.0[pos=1,dim={0,1}]": cp.ProjectOut(torch.ones(4))})


@pytest.mark.parametrize("shape", [(2, 3), (5,), (1, 2, 4)])
def test_project_out_rejects_wrong_basis_shape(toy, x, shape):
    with pytest.raises(cp.SiteError, match=r"basis has shape .*expected \[k, 4\]"):
        toy.run(x, {"hidden.0": cp.ProjectOut(torch.ones(shape))})


def test_project_out_of_a_dependent_basis_removes_only_its_span(toy, x):
    basis = torch.tensor([[1.0, 0.0, 0.0, 0.0], [2.0, 0.0, 0.0, 0.0]])  # span = e0
    try:
        new, clean = after(toy, x, "hidden.0", cp.ProjectOut(basis))
    except cp.SiteError:
        return  # refusing a rank-deficient basis clearly would also be a fix
    want = clean.clone()
    want[..., 0] = 0
    close(new, want)


# ---------------------------------------------------------------- serialisation


def every_kind(toy, x, ref):
    cache = toy.capture(ref[:3], ["hidden.0", "hidden.1"])
    big_cache = toy.capture(ref, ["hidden.0", "hidden.1"])
    return [
        ("hidden.0[pos=1]", cp.Patch(cache)),
        ("hidden.0[pos=1]", cp.Patch(ref[:3])),
        ("hidden.0[pos=1]", cp.Patch({"x": ref[:3]})),
        ("hidden.1", cp.Zero()),
        ("hidden.0[pos={0,2}]", cp.Mean(big_cache)),
        ("hidden.0", cp.Mean(ref, over=("batch", "pos"))),
        ("hidden.1[dim=1]", cp.Resample(big_cache, seed=4)),
        ("hidden.1[dim=1]", cp.Resample(ref, seed=2)),
        ("hidden.0", cp.Noise(scale=0.3, seed=6)),
        ("hidden.0[pos=3]", cp.Noise(std=2.0, seed=1)),
        ("hidden.0", cp.Add(torch.arange(4.0), alpha=-0.5)),
        ("hidden.0[pos=4]", cp.Scale(1.7)),
        ("hidden.1", cp.ProjectOut(randn(2, 4, seed=28))),
        ("hidden.0[pos=2]", cp.Set(torch.tensor([1.5, -1.0, 0.0, 2.0]))),
    ]


def test_every_builtin_kind_is_covered():
    assert set(cp.interventions.BUILTIN_INTERVENTIONS) == {
        "patch", "zero", "mean", "resample", "noise", "add", "scale", "project_out", "set",
    }


def test_round_trip_through_dict_has_identical_effect(toy, x, ref):
    for site, iv in every_kind(toy, x, ref):
        data = iv.to_dict()
        assert data["kind"] == iv.kind
        assert not any(isinstance(v, cp.Cache) for v in data.values())  # caches become plain dicts
        back = cp.intervention_from_dict(data)
        assert type(back) is type(iv)
        want = toy.run(x, {site: iv}, capture="hidden.1")
        got = toy.run(x, {site: back}, capture="hidden.1")
        assert torch.equal(got.output, want.output), (site, iv.kind)
        assert torch.equal(got.cache["hidden.1"], want.cache["hidden.1"])
        # and through torch.save / torch.load (weights_only) of that dict
        buf = io.BytesIO()
        torch.save(data, buf)
        buf.seek(0)
        again = cp.intervention_from_dict(torch.load(buf, weights_only=True))
        assert torch.equal(toy.run(x, {site: again}).output, want.output), (site, iv.kind)


def test_round_trip_keeps_fields(ref):
    iv = cp.intervention_from_dict(cp.Noise(scale=0.3, std=1.5, seed=6).to_dict())
    assert (iv.scale, iv.std, iv.seed) == (0.3, 1.5, 6)
    m = cp.intervention_from_dict(cp.Mean(ref, over=("batch", "pos")).to_dict())
    assert tuple(m.over) == ("batch", "pos") and torch.equal(m.reference, ref)
    assert cp.intervention_from_dict({"kind": "scale"}) == cp.Scale()


def test_patch_with_cache_round_trip_rebuilds_a_cache(toy, x):
    cache = toy.capture(x, "hidden.0")
    back = cp.intervention_from_dict(cp.Patch(cache).to_dict())
    assert isinstance(back.source, cp.Cache)
    assert list(back.source) == ["hidden.0"] and back.source.axes == {"hidden.0": ("pos", "dim")}
    assert torch.equal(back.source["hidden.0[pos=1]"], cache["hidden.0[pos=1]"])


def test_unknown_kind_raises_listing_known_kinds():
    with pytest.raises(ValueError, match="unknown intervention kind 'nope'; known kinds: .*add.*patch.*project_out.*zero"):
        cp.intervention_from_dict({"kind": "nope"})
    with pytest.raises(ValueError, match="unknown intervention kind None"):
        cp.intervention_from_dict({})


# ---------------------------------------------------------------- Fn: plain functions


def test_a_plain_function_is_an_intervention(toy, x):
    want = toy.run(x, {"hidden.0[pos=1]": cp.Zero()}, capture="hidden.0")
    got = toy.run(x, {"hidden.0[pos=1]": lambda a: a * 0}, capture="hidden.0")
    assert torch.equal(got.output, want.output) and torch.equal(got.cache["hidden.0"], want.cache["hidden.0"])
    fn = toy.run(x, {"hidden.0[pos=1]": cp.Fn(lambda a: a * 0)}).output
    assert torch.equal(fn, want.output)
    # the function receives the selection, shaped [rows, *selected axes], as built-ins do
    shapes = []
    toy.run(x, {"hidden.0[pos=1:3]": lambda a: shapes.append(tuple(a.shape)) or a})
    assert shapes == [(3, 2, 4)]


def test_fn_with_a_source_equals_patch_and_binds_rows_like_builtins(toy, x, ref):
    src = toy.capture(ref[:3], "hidden.0")
    want = toy.run(x, {"hidden.0[pos=2]": cp.Patch(src)}).output
    got = toy.run(x, {"hidden.0[pos=2]": cp.Fn(lambda a, s: s, needs_source=src)}).output
    assert torch.equal(got, want)
    by_inputs = toy.run(x, {"hidden.0[pos=2]": cp.Fn(lambda a, s: s, needs_source=ref[:3])}).output
    assert torch.equal(by_inputs, want)
    # rows: a sweep-style batch of two blocks, each bound to its rows, equals the runs one at a time
    tiled = torch.cat([x, x])
    bounds = [cp.Bound(cp.Site.parse("hidden.0"), cp.Fn(lambda a: a * 2), rows=slice(0, 3)),
              cp.Bound(cp.Site.parse("hidden.0"), cp.Fn(lambda a: a * 3), rows=slice(3, 6))]
    out = toy.run(tiled, bounds).output
    assert torch.equal(out[:3], toy.run(x, {"hidden.0": cp.Scale(2.0)}).output)
    assert torch.equal(out[3:], toy.run(x, {"hidden.0": cp.Scale(3.0)}).output)
    seen = []
    toy.run(x, {"hidden.0[pos=2]": cp.Fn(lambda a, ctx: seen.append(ctx.site) or a)})
    assert str(seen[0]) == "hidden.0[pos=2]"


def test_fn_does_not_serialise_and_says_which_function(toy, x):
    def halve(a):
        return a / 2

    with pytest.raises(TypeError, match=r"Fn\(.*halve at test_interventions.py:\d+\) wraps a Python function, "
                                        r"which does not serialise"):
        cp.Fn(halve).to_dict()
    with pytest.raises(TypeError, match="<lambda>.*does not serialise"):
        cp.Fn(lambda a: a).to_dict()
    with pytest.raises(TypeError, match=r"returns_float.*returned float; it must return a tensor"):
        toy.run(x, {"hidden.0": cp.Fn(returns_float)})
    with pytest.raises(TypeError, match="expected an Intervention .* or a function"):
        toy.run(x, {"hidden.0": 3})


def returns_float(a):
    return 0.5


def test_gradients_flow_through_a_function(toy, x):
    w = torch.tensor(2.0, requires_grad=True)
    run = toy.run(x, {"hidden.0": lambda a: a * w}, grad=True)
    run.output.sum().backward()
    assert w.grad is not None and w.grad.abs() > 0
    # equal to the gradient of the same edit written by hand
    w2 = torch.tensor(2.0, requires_grad=True)
    net = toy.module
    h = torch.relu(net.layers[0](x)) * w2
    net.head(torch.relu(net.layers[1](h))).sum().backward()
    close(w.grad, w2.grad)


# ---------------------------------------------------------------- sites given once


def test_capture_reads_an_iterable_of_sites_once(toy, x):
    first = toy.capture(x, (s for s in ["hidden.0", "hidden.1"]))
    assert sorted(first) == ["hidden.0", "hidden.1"]
    again = toy.capture(x, (s for s in ["hidden.0", "hidden.1"]))  # the memo was not poisoned
    assert sorted(again) == ["hidden.0", "hidden.1"]
    assert sorted(toy.run(x, capture=iter(["hidden.1"])).cache) == ["hidden.1"]
    with pytest.raises(TypeError, match="sites must be a site pattern string, a Site, or an iterable"):
        toy.capture(x, 3)
    with pytest.raises(TypeError, match="list of lists"):
        toy.capture(x, [["hidden.0"]])


@pytest.mark.parametrize("pad", ["right", "left"])
def test_mean_counts_only_real_positions_of_a_padded_reference(pad):
    """Mean over a padded reference set averages each position over the rows where it is a real token
    (and over real positions only when ``pos`` is averaged too): equal to the mean taken by hand."""
    from conftest import padded_prompts, randomize, tiny_gpt2

    m = cp.wrap(randomize(tiny_gpt2()))
    ref, x = padded_prompts(11, pad=pad), padded_prompts(12)
    acts = m.capture(ref, "resid_pre.1")["resid_pre.1"].double()
    mask = ref["attention_mask"].double()
    per_pos = (acts * mask[..., None]).sum(0) / mask.sum(0)[:, None]
    overall = (acts * mask[..., None]).sum((0, 1)) / mask.sum()
    assert not torch.allclose(per_pos, acts.mean(0)), "the padding must matter for this test to mean anything"
    for intervention, expected in [(cp.Mean(ref), per_pos), (cp.Mean(ref, over=("batch", "pos")), overall)]:
        got = m.run(x, {"resid_pre.1": intervention}, capture="resid_pre.1").cache["resid_pre.1"].double()
        assert torch.allclose(got, expected.expand_as(got), atol=1e-5), (got - expected).abs().max()
