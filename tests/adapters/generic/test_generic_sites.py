"""The generic adapter's catalog: which module is which site, axes, fields, and when it is read."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import crosspatch as cp
from crosspatch.adapters.generic import GenericAdapter, GenericCatalog, SharedModuleError
from crosspatch.engine.adapter import Adapter
from crosspatch.engine.model import find_adapter
from crosspatch.plugins import registry
from crosspatch.sites.site import Site, SiteError
from generic_models import CNN, MLP, FieldNet, SharedAct, no_hooks_left, seeded, sequential_mlp


def families(m) -> dict[str, tuple]:
    """family -> (layers, axis names, axis sizes)."""
    return {f.name: (f.layers, f.axis_names, tuple(a.size for a in f.axes)) for f in m.sites()}


def read(model: nn.Module, inputs) -> cp.WrappedModel:
    m = cp.wrap(model)
    m.prepare(inputs)
    return m


def test_wrap_finds_the_generic_adapter_for_a_plain_module():
    m = cp.wrap(nn.Sequential(nn.Linear(2, 2)))
    assert m.adapter.name == "generic" and isinstance(m.catalog, GenericCatalog)


def test_the_catalog_is_empty_until_inputs_are_seen():
    m = cp.wrap(MLP().eval())
    assert len(m.sites()) == 0 and "no sites yet" in repr(m.sites())
    with pytest.raises(SiteError, match="no sites yet"):
        m.catalog.resolve("module.head")
    out = m.run(seeded(0, 2, 4), capture="module.head")  # the first run reads the sites, then captures
    assert out.cache["module.head"].shape == (2, 3)


def test_a_stack_of_numbered_children_is_one_family_with_layers():
    m = read(MLP().eval(), seeded(0, 2, 4))
    fams = families(m)
    assert fams["module.embed"] == (None, ("d1",), (8,))
    assert fams["module.layers"] == (3, ("d1",), (8,))  # the blocks' outputs
    assert fams["module_in.layers"] == (3, ("d1",), (8,))
    assert fams["module.layers.fc"] == (3, ("d1",), (8,))  # inside every block: the layer moves to the end
    assert fams["module.layers.act"] == (3, ("d1",), (8,))
    assert fams["module"] == (None, ("d1",), (3,)) and fams["module_in"] == (None, ("d1",), (4,))
    assert "stack.layers" not in fams  # a ModuleList never runs itself
    assert Site.parse("module.layers.fc.2") == Site("module.layers.fc", 2)
    sweep = m.catalog.expand("module.layers.*")
    assert [str(s) for s in sweep.sites] == ["module.layers.0", "module.layers.1", "module.layers.2"]


def test_a_root_sequential_is_a_stack_whose_own_output_is_stack():
    m = read(sequential_mlp().eval(), seeded(0, 2, 4))
    fams = families(m)
    assert fams["module"] == (5, ("d1",), (None,))  # widths 8, 8, 8, 8, 3 differ: no size
    assert fams["module_in"] == (5, ("d1",), (None,))
    assert fams["stack"] == (None, ("d1",), (3,)) and fams["stack_in"] == (None, ("d1",), (4,))


def test_steps_of_different_ranks_are_spelled_with_underscores():
    m = read(CNN().eval(), seeded(0, 2, 3, 12, 12))
    fams = families(m)
    assert fams["module.features._0"] == (None, ("d1", "d2", "d3"), (4, 10, 10))  # channels first
    assert fams["module.features._3"] == (None, ("d1", "d2", "d3"), (6, 3, 3))
    assert fams["module.features._7"] == (None, ("d1",), (6,))
    assert fams["module.features"] == (None, ("d1",), (6,))  # not a stack: its own output is module.
    assert "stack.features" not in fams and "module.features._0" in m.catalog


def test_every_module_that_runs_once_has_exactly_one_output_site():
    model = MLP().eval()
    m = read(model, seeded(0, 2, 4))
    modules = dict(model.named_modules())
    served = {}
    for fam in m.sites():
        if fam.name.split(".")[0] not in ("module", "stack"):
            continue
        for layer in [None] if fam.layers is None else range(fam.layers):
            module = fam.reach.module(layer)
            assert id(module) not in served, f"{fam.name}.{layer} and {served[id(module)]} name one module"
            served[id(module)] = f"{fam.name}.{layer}"
    ran = {name for name, mod in modules.items() if not isinstance(mod, nn.ModuleList)}
    assert {id(modules[name]) for name in ran} == set(served)


def test_a_stack_inside_a_layer_is_spelled_not_layered():
    class Inner(nn.Module):
        def __init__(self):
            super().__init__()
            self.convs = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))

        def forward(self, x):
            return self.convs(x)

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([Inner(), Inner()])

        def forward(self, x):
            for block in self.blocks:
                x = block(x)
            return x

    m = read(Outer().eval(), seeded(0, 2, 4))
    fams = families(m)
    assert fams["module.blocks.convs._1"][0] == 2  # blocks.L.convs.1: the outer number is the layer
    assert fams["module.blocks.convs"][0] == 2  # the inner Sequential's own output is plain module.
    assert "stack.blocks.convs" not in fams


def test_a_part_only_some_layers_have_keeps_its_number_in_the_name():
    class Block(nn.Module):
        def __init__(self, down: bool):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.down = nn.Linear(4, 4) if down else None

        def forward(self, x):
            x = self.fc(x)
            return self.down(x) if self.down is not None else x

    model = nn.Sequential(Block(True), Block(False)).eval()
    fams = families(read(model, seeded(0, 2, 4)))
    assert fams["module.fc"][0] == 2 and fams["module"][0] == 2
    assert fams["module._0.down"][0] is None and "module.down" not in fams


def test_tuple_dict_namedtuple_and_dataclass_fields():
    for kind in ("tuple", "namedtuple"):
        fams = families(read(FieldNet(kind).eval(), seeded(0, 2, 6)))
        assert "module.split" in fams and "module_out1.split" in fams and "module_out2.split" not in fams
    for kind in ("dict", "dataclass"):
        fams = families(read(FieldNet(kind).eval(), seeded(0, 2, 6)))
        assert "module.split" in fams and "module_out_aux.split" in fams
        assert not {"module_out_count.split", "module_out_note.split", "module_out_main.split"} & set(fams)


def test_integer_inputs_are_not_sites():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2)).eval()
    fams = families(read(model, torch.randint(0, 10, (2, 5))))
    assert "module_in._0" not in fams and "module_in" not in fams and "module._0" in fams


def test_module_names_the_grammar_cannot_spell_have_no_site():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.parts = nn.ModuleDict({"a-b": nn.Linear(2, 2), "ok": nn.Linear(2, 2)})

        def forward(self, x):
            return self.parts["ok"](self.parts["a-b"](x))

    fams = families(read(Net().eval(), seeded(0, 2, 2)))
    assert "module.parts.ok" in fams and not any("a-b" in name for name in fams)


def test_a_shared_module_has_no_site_and_asking_for_it_names_it():
    m = read(SharedAct().eval(), seeded(0, 2, 4))
    assert "module.act" not in m.catalog and "module.fc1" in m.catalog
    with pytest.raises(SharedModuleError, match=r"module\.act.*module 'act' runs 2 times"):
        m.capture(seeded(0, 2, 4), "module.act")


def test_a_module_that_did_not_run_is_named_in_the_error():
    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(2, 2)
            self.spare = nn.Linear(2, 2)

        def forward(self, x):
            return self.used(x)

    m = read(Unused().eval(), seeded(0, 2, 2))
    with pytest.raises(SiteError, match="module 'spare' did not run"):
        m.catalog.resolve("module.spare")


def test_new_input_sizes_are_read_again_and_known_ones_are_not():
    model = CNN().eval()
    forwards = []
    handle = model.register_forward_pre_hook(lambda mod, args: forwards.append(args[0].shape[0]))
    try:
        m = cp.wrap(model)
        m.prepare(seeded(0, 2, 3, 12, 12))
        assert m.catalog.family("module.features._0").axes[1].size == 10 and forwards == [3]  # probe: 3 rows
        m.prepare(seeded(0, 5, 3, 16, 16))
        assert m.catalog.family("module.features._0").axes[1].size == 14 and forwards == [3, 3]
        m.prepare(seeded(1, 4, 3, 12, 12))  # sizes seen before: no forward
        assert m.catalog.family("module.features._0").axes[1].size == 10 and forwards == [3, 3]
        assert m.run(seeded(1, 4, 3, 12, 12), capture="module.features._0").cache["module.features._0"].shape == (4, 4, 10, 10)
    finally:
        handle.remove()


def test_the_probe_leaves_a_training_model_untouched_and_no_hooks():
    model = CNN().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    cp.wrap(model, train_ok=True).prepare(seeded(0, 4, 3, 12, 12))  # wrap would put it in eval mode
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # batch-norm statistics too
    assert torch.equal(rng, torch.get_rng_state()) and model.training and no_hooks_left(model)


def test_a_forward_that_raises_in_the_probe_leaves_no_hooks():
    model = MLP().eval()
    with pytest.raises(RuntimeError):
        cp.wrap(model).prepare(seeded(0, 2, 5))  # wrong width
    assert no_hooks_left(model)


# -- which adapter wrap picks ------------------------------------------------------------------------


class _Named(Adapter):
    def __init__(self, name: str, fallback: bool, claims: type):
        self.name, self.fallback, self.claims = name, fallback, claims

    def matches(self, model):
        return isinstance(model, self.claims)


def test_fallback_adapters_are_asked_last(monkeypatch):
    catch_all = _Named("catch_all", True, nn.Module)
    specific = _Named("specific", False, nn.Sequential)

    class Fake:
        def adapters(self):
            return [catch_all, specific]  # the fallback comes first in plugin order

    monkeypatch.setattr(registry, "get_registry", lambda: Fake())
    assert find_adapter(nn.Sequential()) is specific
    assert find_adapter(nn.Linear(1, 1)) is catch_all
    assert find_adapter(nn.Sequential(), "catch_all") is catch_all


def test_no_fallback_installed_still_refuses(monkeypatch):
    class Fake:
        def adapters(self):
            return [_Named("specific", False, nn.Sequential)]

    monkeypatch.setattr(registry, "get_registry", lambda: Fake())
    with pytest.raises(cp.AdapterError, match="no crosspatch adapter serves"):
        find_adapter(nn.Linear(1, 1))


def test_an_instance_can_be_given_directly():
    m = cp.wrap(MLP().eval(), GenericAdapter())
    assert m.adapter.name == "generic" and m.capture(seeded(0, 2, 4), "module.head")["module.head"].shape == (2, 3)


def test_a_pickled_wrapped_model_keeps_reading_sites():
    import pickle

    m = cp.wrap(CNN().eval())
    m.prepare(seeded(0, 2, 3, 12, 12))
    copy = pickle.loads(pickle.dumps(m))
    assert copy.module is not m.module and "module.features._0" in copy.catalog
    cache = copy.capture(seeded(0, 2, 3, 16, 16), "module.features._0")  # new sizes: read again, on the copy
    assert cache["module.features._0"].shape == (2, 4, 14, 14)
    assert copy.catalog.family("module.features._0").axes[1].size == 14
    assert m.catalog.family("module.features._0").axes[1].size == 10  # the original is its own


def test_nothing_keeps_a_wrapped_model_alive():
    import gc
    import weakref

    model = MLP().eval()
    m = cp.wrap(model)
    m.capture(seeded(0, 2, 4), "module.head")
    alive = weakref.ref(model)
    del m, model
    gc.collect()
    assert alive() is None


def test_a_module_under_two_names_has_the_first_and_the_second_says_so():
    class Alias(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2, 2)
            self.same = self.fc

        def forward(self, x):
            return self.fc(x)

    m = read(Alias().eval(), seeded(0, 2, 2))
    assert "module.fc" in m.catalog and "module.same" not in m.catalog
    with pytest.raises(SiteError, match="'same' is a second path to module 'fc'; its site is module.fc"):
        m.catalog.resolve("module.same")
