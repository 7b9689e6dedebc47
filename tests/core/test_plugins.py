"""Tests for the plugin registry, with fake plugins installed as real entry points."""

from __future__ import annotations

import importlib
import importlib.metadata
import subprocess
import sys
import textwrap
import types
import warnings
from pathlib import Path

import pluggy
import pytest

from conftest import install_fake_dist
from crosspatch.plugins import registry as plugins
from crosspatch.plugins.hookspecs import hookimpl
from crosspatch.plugins.registry import PluginLoadWarning, Registry, get_registry, reset_registry

FAKE_MODULES = {
    "cpfake_good": '''
        from crosspatch.hookspecs import hookimpl

        class DummyAdapter:
            name = "dummy"

        class DummyIntervention:
            kind = "dummy_iv"

        class ModelSpec:
            name = "tiny-model"

        @hookimpl
        def register_adapters(register):
            register(DummyAdapter())

        @hookimpl
        def register_interventions(register):
            register(DummyIntervention)

        CALLED = []

        @hookimpl
        def register_models():  # takes fewer arguments than the spec
            CALLED.append("register_models")
    ''',
    "cpfake_importfail": '''
        raise ImportError("boom from cpfake_importfail")
    ''',
    "cpfake_hookfail": '''
        from crosspatch.hookspecs import hookimpl

        class A:
            name = "partial"

        class T:
            name = "survivor-task"

        @hookimpl
        def register_adapters(register):
            register(A())
            raise RuntimeError("hook exploded")

        @hookimpl
        def register_tasks(register):
            register(T())
    ''',
    "cpfake_dup": '''
        from crosspatch.hookspecs import hookimpl

        class Other:
            name = "dummy"

        class Unique:
            name = "unique"

        @hookimpl
        def register_adapters(register):
            register(Other())
            register(Unique())
    ''',
}

ENTRY_POINTS = {
    "fp_good": "cpfake_good",
    "fp_importfail": "cpfake_importfail",
    "fp_hookfail": "cpfake_hookfail",
    "fp_dup": "cpfake_dup",
}


def _forget_fake_modules() -> None:
    for mod in FAKE_MODULES:
        sys.modules.pop(mod, None)


@pytest.fixture
def clean(monkeypatch):
    """No plugin env vars, fresh registry before and after."""
    monkeypatch.delenv(plugins.PLUGINS_ENV_VAR, raising=False)
    monkeypatch.delenv(plugins.DISABLE_ENV_VAR, raising=False)
    _forget_fake_modules()
    reset_registry()
    yield
    _forget_fake_modules()
    reset_registry()


@pytest.fixture
def fakeplug(tmp_path, monkeypatch, clean):
    """The fake distribution on sys.path; discovery limited to it."""
    install_fake_dist(tmp_path, FAKE_MODULES, ENTRY_POINTS)
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    return tmp_path


@pytest.fixture
def only_fakeplug(fakeplug, monkeypatch):
    """Hide every entry point not declared by the fake distribution (e.g. built-ins)."""
    real = importlib.metadata.entry_points

    def entry_points(**kw):
        return [ep for ep in real(**kw) if ep.dist is not None and ep.dist.metadata["Name"] == "fakeplug"]

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    return fakeplug


def collect(fn):
    """Run ``fn`` and return (result, list of PluginLoadWarning messages)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn()
    msgs = [str(w.message) for w in caught if issubclass(w.category, PluginLoadWarning)]
    return result, msgs


def load_everything(reg: Registry):
    return reg.adapters(), reg.models(), reg.tasks(), reg.interventions(), reg.plugins()


# -- entry-point discovery ------------------------------------------------------


def test_fake_dist_is_discoverable(fakeplug):
    eps = importlib.metadata.entry_points(group="crosspatch")
    assert {"fp_good", "fp_importfail", "fp_hookfail", "fp_dup"} <= {ep.name for ep in eps}


def test_good_plugin_items_present_and_broken_ones_skipped(only_fakeplug):
    reg = get_registry()
    (adapters, models, tasks, interventions, infos), msgs = collect(lambda: load_everything(reg))

    # good plugin
    assert [a.name for a in adapters] == ["dummy", "unique"]
    assert type(adapters[0]).__module__ == "cpfake_good"  # first registration wins
    assert list(interventions) == ["dummy_iv"]
    assert isinstance(interventions["dummy_iv"], type)
    assert sys.modules["cpfake_good"].CALLED == ["register_models"]  # fewer-args impl called
    assert models == {}
    # the hook that raised is skipped with its partial registration; its other hook works
    assert "partial" not in {a.name for a in adapters}
    assert list(tasks) == ["survivor-task"]

    by_name = {i.name: i for i in infos}
    assert list(by_name) == ["fp_good", "fp_importfail", "fp_hookfail", "fp_dup"]
    good = by_name["fp_good"]
    assert (good.distribution, good.version, good.module) == ("fakeplug", "0.1", "cpfake_good")
    assert good.registered == {"adapters": ["dummy"], "interventions": ["dummy_iv"]}
    assert good.errors == [] and good.status == "ok"
    assert by_name["fp_importfail"].status == "failed"
    assert by_name["fp_importfail"].registered == {}
    assert by_name["fp_hookfail"].registered == {"tasks": ["survivor-task"]}
    assert by_name["fp_hookfail"].status == "errors"
    assert by_name["fp_dup"].registered == {"adapters": ["unique"]}

    # one warning per problem, each naming what went wrong
    assert len(msgs) == 3, msgs
    (imp,) = [m for m in msgs if "fp_importfail" in m]
    assert "fakeplug 0.1" in imp and "ImportError" in imp and "boom from cpfake_importfail" in imp
    assert "skipped" in imp
    (hook,) = [m for m in msgs if "fp_hookfail" in m]
    assert "register_adapters" in hook and "RuntimeError: hook exploded" in hook and "fakeplug 0.1" in hook
    (dup,) = [m for m in msgs if "fp_dup" in m]
    assert "'dummy'" in dup and "fp_good" in dup

    assert sorted(reg.errors()) == sorted(msgs)


def test_registry_is_lazy_and_warns_once(only_fakeplug):
    reg = get_registry()
    assert "cpfake_good" not in sys.modules  # nothing imported until first use
    _, first = collect(lambda: load_everything(reg))
    _, second = collect(lambda: load_everything(reg))
    assert first and second == []
    assert get_registry() is reg


def test_reset_registry_builds_a_new_one(only_fakeplug):
    reg = get_registry()
    reset_registry()
    assert get_registry() is not reg


def test_disable_env_skips_by_name_without_warning(only_fakeplug, monkeypatch):
    monkeypatch.setenv(plugins.DISABLE_ENV_VAR, "fp_importfail, fp_dup")
    reg = get_registry()
    (adapters, *_rest, infos), msgs = collect(lambda: load_everything(reg))
    assert not any("fp_importfail" in m for m in msgs)
    assert not any("fp_dup" in m for m in msgs)
    assert [m for m in msgs if "fp_hookfail" in m]  # still loaded, still warned
    assert [a.name for a in adapters] == ["dummy"]
    by_name = {i.name: i for i in infos}
    assert by_name["fp_importfail"].disabled and by_name["fp_importfail"].status == "disabled"
    assert by_name["fp_importfail"].errors == []
    assert "cpfake_importfail" not in sys.modules
    assert not by_name["fp_good"].disabled


def test_allow_list_env(fakeplug, monkeypatch):
    # real discovery (no filtering): the allow-list alone keeps built-ins out too
    monkeypatch.setenv(plugins.PLUGINS_ENV_VAR, "fp_good")
    reg = get_registry()
    (adapters, *_rest, infos), msgs = collect(lambda: load_everything(reg))
    assert msgs == []
    assert [a.name for a in adapters] == ["dummy"]
    loaded = [i.name for i in infos if i.loaded]
    assert loaded == ["fp_good"]
    assert all(i.disabled for i in infos if i.name != "fp_good")


def test_allow_list_set_but_empty_loads_nothing(fakeplug, monkeypatch):
    monkeypatch.setenv(plugins.PLUGINS_ENV_VAR, "")
    reg = get_registry()
    (adapters, models, tasks, interventions, infos), msgs = collect(lambda: load_everything(reg))
    assert msgs == [] and adapters == [] and interventions == {}
    assert infos and all(i.disabled for i in infos)


def test_exact_duplicate_entry_points_are_deduplicated(only_fakeplug, monkeypatch):
    real = importlib.metadata.entry_points  # already filtered to fakeplug
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda **kw: list(real(**kw)) * 2)
    monkeypatch.setenv(plugins.PLUGINS_ENV_VAR, "fp_good")
    (infos), msgs = collect(lambda: get_registry().plugins())
    assert [i.name for i in infos].count("fp_good") == 1
    assert msgs == []


def test_same_entry_point_name_different_target_warns(only_fakeplug, monkeypatch):
    real = importlib.metadata.entry_points
    clash = importlib.metadata.EntryPoint(name="fp_good", value="cpfake_dup", group="crosspatch")
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda **kw: list(real(**kw)) + [clash])
    monkeypatch.setenv(plugins.PLUGINS_ENV_VAR, "fp_good")
    reg = get_registry()
    (adapters, *_rest, infos), msgs = collect(lambda: load_everything(reg))
    assert [a.name for a in adapters] == ["dummy"]
    assert len(msgs) == 1 and "already used" in msgs[0] and "cpfake_good" in msgs[0]


def test_entry_point_listing_failure_is_a_warning(clean, monkeypatch):
    def broken(**kw):
        raise ValueError("corrupt metadata")

    monkeypatch.setattr(importlib.metadata, "entry_points", broken)
    reg = get_registry()
    (adapters, *_), msgs = collect(lambda: load_everything(reg))
    assert adapters == []
    assert len(msgs) == 1 and "corrupt metadata" in msgs[0]
    assert reg.errors() == msgs


# -- programmatic registration ------------------------------------------------------


class _Named:
    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return f"_Named({self.name!r})"


def test_register_object_plugin_and_fewer_args():
    calls = []

    class Plugin:
        @hookimpl
        def register_adapters(self, register):
            register(_Named("a1"))

        @hookimpl
        def register_tasks(self):  # no arguments at all
            calls.append("tasks")

    reg = Registry(entry_points=False)
    assert reg.register(Plugin(), "mine") == "mine"
    (adapters, models, tasks, interventions, infos), msgs = collect(lambda: load_everything(reg))
    assert msgs == []
    assert [a.name for a in adapters] == ["a1"]
    assert calls == ["tasks"]
    (info,) = infos
    assert info.name == "mine" and info.distribution is None and info.module == __name__
    assert info.registered == {"adapters": ["a1"]} and info.status == "ok"


def test_register_module_plugin_after_first_use():
    mod = types.ModuleType("cp_inline_plugin")

    @hookimpl
    def register_models(register):
        register(_Named("m1"))

    mod.register_models = register_models
    reg = Registry(entry_points=False)
    assert reg.models() == {}  # collected before the plugin exists
    reg.register(mod, "inline")
    assert list(reg.models()) == ["m1"]  # picked up incrementally
    assert reg.plugins()[0].module == "cp_inline_plugin"


def test_register_duplicate_plugin_name_raises():
    reg = Registry(entry_points=False)
    reg.register(types.ModuleType("p1"), "same")
    with pytest.raises(ValueError, match="already registered"):
        reg.register(types.ModuleType("p2"), "same")


def test_register_invalid_hookimpl_raises():
    class Bad:
        @hookimpl
        def register_adapters(self, register, not_in_spec):
            pass

    with pytest.raises(pluggy.PluginValidationError):
        Registry(entry_points=False).register(Bad(), "bad")


@pytest.mark.parametrize(
    "hook, item, expect",
    [
        ("register_adapters", object(), "non-empty str .name"),
        ("register_models", _Named(""), "non-empty str .name"),
        ("register_tasks", _Named(3), "non-empty str .name"),
        ("register_interventions", type("NoKind", (), {}), "non-empty str .kind"),
        ("register_interventions", type("K", (), {"kind": "k"})(), "must be a class"),
    ],
)
def test_invalid_items_warn_and_discard_the_call(hook, item, expect):
    kind = hook.removeprefix("register_")
    good = type("G", (), {"kind": "good", "name": "good"})

    def impl(register):
        register(good)  # valid, but discarded because the call fails
        register(item)

    impl.__name__ = hook
    plugin = types.ModuleType("cp_invalid")
    setattr(plugin, hook, hookimpl(impl))
    reg = Registry(entry_points=False)
    reg.register(plugin, "invalid")
    result, msgs = collect(getattr(reg, kind))
    assert len(result) == 0
    assert len(msgs) == 1 and "'invalid'" in msgs[0] and hook in msgs[0] and expect in msgs[0]
    assert reg.plugins()[0].errors == msgs


def test_register_callback_is_closed_after_hook_returns():
    kept = []

    class Plugin:
        @hookimpl
        def register_adapters(self, register):
            kept.append(register)

    reg = Registry(entry_points=False)
    reg.register(Plugin(), "late")
    reg.adapters()
    with pytest.raises(RuntimeError, match="after the hook returned"):
        kept[0](_Named("x"))
    assert reg.adapters() == []


def test_duplicate_names_keep_first_and_warn_naming_both():
    def plugin(adapter_name, iv_kind):
        class P:
            @hookimpl
            def register_adapters(self, register):
                register(_Named(adapter_name))

            @hookimpl
            def register_interventions(self, register):
                register(type("IV", (), {"kind": iv_kind}))

        return P()

    first, second = plugin("x", "iv"), plugin("x", "iv")
    reg = Registry(entry_points=False)
    reg.register(first, "first")
    reg.register(second, "second")
    (adapters, _m, _t, ivs, infos), msgs = collect(lambda: load_everything(reg))
    assert len(adapters) == 1 and len(ivs) == 1
    assert len(msgs) == 2
    assert all("'first'" in m and "'second'" in m for m in msgs)
    assert infos[1].registered == {} and len(infos[1].errors) == 2


def test_unknown_hook_name_warns():
    class Typo:
        @hookimpl
        def register_adapter(self, register):  # missing "s"
            pass

    reg = Registry(entry_points=False)
    _, msgs = collect(lambda: reg.register(Typo(), "typo"))
    assert len(msgs) == 1 and "unknown hook 'register_adapter'" in msgs[0]


def test_wrappers_are_ignored():
    class Wrapper:
        @hookimpl(wrapper=True)
        def register_adapters(self, register):
            return (yield)

    reg = Registry(entry_points=False)
    reg.register(Wrapper(), "wrap")
    _, msgs = collect(reg.adapters)
    assert msgs == [] and reg.adapters() == []


def test_importing_plugins_and_cli_stays_light():
    code = textwrap.dedent(
        """
        import sys
        import crosspatch
        before = set(sys.modules)
        import crosspatch.plugins, crosspatch.cli, crosspatch.hookspecs
        heavy = {"torch", "transformers", "numpy", "diffusers", "open_clip"}
        print(sorted(heavy & (set(sys.modules) - before)))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
