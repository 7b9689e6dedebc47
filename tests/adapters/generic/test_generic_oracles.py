"""The generic adapter against plain torch hooks: captures, writes, every intervention, activation patching."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import crosspatch as cp
from crosspatch.adapters.generic import SharedModuleError
from crosspatch.engine.forward import Bound
from crosspatch.sites.catalog import Axis, Catalog, SiteFamily
from crosspatch.engine.reach import ModuleOutput
from generic_models import CNN, MLP, FieldNet, Repeats, no_hooks_left, raw_hook, record_output, seeded

X = seeded(10, 4, 4)
X2 = seeded(11, 4, 4)


def mlp():
    return MLP().eval()


@pytest.mark.parametrize("site,path,kind", [
    ("module.embed", "embed", "out"), ("module.layers.1", "layers.1", "out"), ("module_in.layers.2", "layers.2", "in"),
    ("module.layers.act.0", "layers.0.act", "out"), ("module_in.head", "head", "in"), ("module", "", "out"),
])
def test_capture_equals_a_raw_hook(site, path, kind):
    model = mlp()
    m = cp.wrap(model)
    seen = {}
    module = model.get_submodule(path)
    if kind == "out":
        with record_output(module, seen):
            model(X)
    else:
        handle = module.register_forward_pre_hook(lambda mod, args: seen.update(out=args[0].detach().clone()))
        model(X)
        handle.remove()
    captured = m.capture(X, site)[cp.Site.parse(site).key]
    assert torch.equal(captured, seen["out"])
    assert no_hooks_left(model)


def test_self_patch_changes_nothing_bit_for_bit():
    model = mlp()
    m = cp.wrap(model)
    m.prepare(X)  # reads the sites
    keys = [cp.Site(f.name, layer).key for f in m.sites() for layer in ([None] if f.layers is None else range(f.layers))]
    assert len(keys) == 24  # 12 families, 6 of them with 3 layers
    base = m.run(X, capture=keys)
    patch = cp.Patch(base.cache)
    out = m.run(X, {key: patch for key in keys}, capture=keys)
    assert torch.equal(out.output, base.output)
    assert all(torch.equal(out.cache[k], base.cache[k]) for k in keys)


def _replace_output(model, path, fn):
    """Run the model with a hand-written hook replacing the output of the module at ``path``."""
    with raw_hook(model.get_submodule(path), lambda mod, args, out: fn(out)):
        with torch.no_grad():
            return model(X)


def test_zero_equals_a_hand_hook_zeroing_the_output():
    model = mlp()
    expected = _replace_output(model, "layers.1.fc", torch.zeros_like)
    got = cp.wrap(model).run(X, {"module.layers.fc.1": cp.Zero()}).output
    assert torch.equal(got, expected)
    assert not torch.equal(got, model(X))


def test_zero_on_a_selection_equals_a_hand_hook_on_those_units():
    model = mlp()

    def zero_units(out):
        out = out.clone()
        out[:, 2:5] = 0
        return out

    expected = _replace_output(model, "layers.0", zero_units)
    assert torch.equal(cp.wrap(model).run(X, {"module.layers.0[d1=2:5]": cp.Zero()}).output, expected)


def _reference(model: nn.Module, path: str, size: int) -> cp.WrappedModel:
    """A hand-written adapter serving one site, the output of ``path``, through the built-in ModuleOutput."""
    generic = cp.wrap(model, "generic")

    class One(type(generic.adapter)):
        name = "one"

        def catalog(self, model):
            return Catalog([SiteFamily("site", (Axis("d1", size),), ModuleOutput(model, path))], "ref")

    ref = cp.wrap(model, One())
    return ref


INTERVENTIONS = {
    "patch": lambda: cp.Patch(X2),
    "zero": lambda: cp.Zero(),
    "mean": lambda: cp.Mean(X2),
    "resample": lambda: cp.Resample(X2, seed=3),
    "noise": lambda: cp.Noise(scale=0.5, seed=2),
    "add": lambda: cp.Add(torch.arange(8.0), alpha=0.5),
    "scale": lambda: cp.Scale(0.25),
    "project_out": lambda: cp.ProjectOut(seeded(4, 2, 8)),
    "set": lambda: cp.Set(1.5),
}


@pytest.mark.parametrize("kind", list(INTERVENTIONS))
def test_every_intervention_equals_the_same_on_a_hand_written_reach(kind):
    model = mlp()
    got = cp.wrap(model).run(X, {"module.layers.fc.1": INTERVENTIONS[kind]()}).output
    expected = _reference(model, "layers.1.fc", 8).run(X, {"site": INTERVENTIONS[kind]()}).output
    assert torch.equal(got, expected)
    assert not torch.equal(got, model(X))


def test_simple_interventions_equal_hand_hooks():
    model = mlp()
    basis = seeded(4, 2, 8).double()
    q, _ = torch.linalg.qr(basis.T)
    cases = {
        "scale": (cp.Scale(0.25), lambda out: out * 0.25),
        "add": (cp.Add(torch.arange(8.0), alpha=0.5), lambda out: out + 0.5 * torch.arange(8.0)),
        "set": (cp.Set(1.5), lambda out: torch.full_like(out, 1.5)),
        "project_out": (cp.ProjectOut(seeded(4, 2, 8)),
                        lambda out: (out.double() - (out.double() @ q) @ q.T).float()),
    }
    m = cp.wrap(model)
    for name, (intervention, hand) in cases.items():
        got = m.run(X, {"module.layers.fc.1": intervention}).output
        assert torch.allclose(got, _replace_output(model, "layers.1.fc", hand), atol=1e-6), name


def test_patch_equals_a_hand_hook_writing_the_source_activation():
    model = mlp()
    source = {}
    with record_output(model.get_submodule("layers.2"), source), torch.no_grad():
        model(X2)
    expected = _replace_output(model, "layers.2", lambda out: source["out"])
    assert torch.equal(cp.wrap(model).run(X, {"module.layers.2": cp.Patch(X2)}).output, expected)


def test_a_write_to_an_input_equals_a_hand_pre_hook():
    model = mlp()
    handle = model.head.register_forward_pre_hook(lambda mod, args: (args[0] * 0,))
    with torch.no_grad():
        expected = model(X)
    handle.remove()
    assert torch.equal(cp.wrap(model).run(X, {"module_in.head": cp.Zero()}).output, expected)


def test_batched_rows_equal_one_at_a_time():
    model = mlp()
    m = cp.wrap(model)
    bounds = [Bound(cp.Site.parse("module.layers.1[d1=3]"), cp.Zero(), rows=slice(1, 2)),
              Bound(cp.Site.parse("module.layers.fc.0"), cp.Scale(2.0), rows=slice(3, 4))]
    batched = m.run(X, bounds, capture="module.layers.*")
    for row, interventions in enumerate([{}, {"module.layers.1[d1=3]": cp.Zero()}, {},
                                         {"module.layers.fc.0": cp.Scale(2.0)}]):
        one = m.run(X[row : row + 1], interventions, capture="module.layers.*")
        assert torch.allclose(one.output, batched.output[row : row + 1], atol=1e-6)
        for key in one.cache:
            assert torch.allclose(one.cache[key], batched.cache[key][row : row + 1], atol=1e-6)


def test_activation_patching_equals_one_at_a_time_hand_hooks():
    model = mlp()
    clean, corrupt = seeded(20, 3, 4), seeded(21, 3, 4)

    def metric(out):
        return out[:, 0] - out[:, 1]

    res = cp.activation_patching(model, clean, corrupt, "module.layers.*[d1=*]", metric)
    assert res.dims == ("layer", "d1") and res.values.shape == (3, 8)
    with torch.no_grad():
        base = metric(model(corrupt))
        expected = torch.zeros(3, 8, dtype=torch.float64)
        for layer in range(3):
            block = model.layers[layer]
            stored = {}
            with record_output(block, stored):
                model(clean)
            for unit in range(8):
                def patch(mod, args, out, unit=unit):
                    out = out.clone()
                    out[:, unit] = stored["out"][:, unit]
                    return out

                with raw_hook(block, patch):
                    expected[layer, unit] = (metric(model(corrupt)) - base).double().mean()
    assert torch.allclose(torch.as_tensor(res.values), expected, atol=1e-6)
    assert expected.abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["tuple", "dict", "namedtuple", "dataclass"])
def test_a_field_of_a_structured_output_is_captured_and_written(kind):
    model = FieldNet(kind).eval()
    m = cp.wrap(model)
    x = seeded(5, 3, 6)
    aux = "module_out1.split" if kind in ("tuple", "namedtuple") else "module_out_aux.split"
    field = 1 if kind in ("tuple", "namedtuple") else "aux"
    seen = {}
    with record_output(model.split, seen, field=field), torch.no_grad():
        model(x)
    assert torch.equal(m.capture(x, aux)[aux], seen["out"])
    # Zero on the aux field == the same network with that field zeroed by hand.
    with torch.no_grad():
        main = model.split.a(x)
        expected = model.head(torch.cat([main, torch.relu(torch.zeros_like(main))], dim=-1))
    assert torch.equal(m.run(x, {aux: cp.Zero()}).output, expected)
    assert torch.equal(m.run(x, {"module.split": cp.Patch(m.capture(x, "module.split"))}).output, model(x))


def test_a_tuple_output_keeps_its_non_tensor_fields_when_written():
    model = FieldNet("tuple").eval()
    m = cp.wrap(model)
    model.seen = None
    m.run(seeded(5, 3, 6), {"module_out1.split": cp.Zero()})
    kind, note, aux = model.seen  # what the network's own forward received from split
    assert kind is tuple and note == "a note" and torch.equal(aux, torch.zeros_like(aux))


def test_a_module_that_runs_twice_at_run_time_raises_naming_it():
    model = Repeats().eval()
    m = cp.wrap(model)
    m.prepare(X)  # read with one call per forward
    model.repeat = 2
    with pytest.raises(SharedModuleError, match=r"site module\.block: module 'block' ran a second time"):
        m.capture(X, "module.block")
    with pytest.raises(SharedModuleError, match="module_in.block"):
        m.run(X, {"module_in.block": cp.Zero()})
    assert no_hooks_left(model)


def test_conv_captures_before_an_in_place_relu_equal_a_raw_hook():
    model = CNN().eval()
    x = seeded(6, 3, 3, 12, 12)
    m = cp.wrap(model)
    seen = {}
    with record_output(model.features[0], seen), torch.no_grad():
        model(x)
    assert (seen["out"] < 0).any()  # the ReLU after it works in place
    cache = m.capture(x, ["module.features._0", "module_in.features._1", "module.features._1"])
    assert torch.equal(cache["module.features._0"], seen["out"])
    assert torch.equal(cache["module_in.features._1"], seen["out"])
    assert torch.equal(cache["module.features._1"], seen["out"].relu())
    assert m.catalog.family("module.features._0").axis_names == ("d1", "d2", "d3")
    # A write there survives the in-place ReLU as the value written, and the capture of it too.
    run = m.run(x, {"module.features._0[d1=1]": cp.Scale(-1.0)}, capture="module.features._0")
    expected_in = seen["out"].clone()
    expected_in[:, 1] *= -1
    assert torch.equal(run.cache["module.features._0"], expected_in)
    zeroed = _replace_conv(model, x)
    assert torch.equal(m.run(x, {"module.features._3": cp.Zero()}).output, zeroed)


def _replace_conv(model, x):
    with raw_hook(model.features[3], lambda mod, args, out: torch.zeros_like(out)), torch.no_grad():
        return model(x)
