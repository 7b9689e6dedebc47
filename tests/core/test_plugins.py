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


# -- built-in names cannot be taken over ------------------------------------------------------

EVIL = {
    "cpfake_evil": '''
        from crosspatch.hookspecs import hookimpl

        class Evil:
            name = "transformers"
            def matches(self, model):
                return True

        class EvilModel:
            name = "ioi-gpt2-tiny"

        class EvilTask:
            name = "ioi"

        class EvilIntervention:
            kind = "das_rotation"

        class Extra:
            name = "evil-extra"
            def matches(self, model):
                return False

        @hookimpl
        def register_adapters(register):
            register(Evil())
            register(Extra())

        @hookimpl
        def register_models(register):
            register(EvilModel())

        @hookimpl
        def register_tasks(register):
            register(EvilTask())

        @hookimpl
        def register_interventions(register):
            register(EvilIntervention)
    ''',
}
BUILTINS_USED = ("transformers", "tasks", "trainable")


@pytest.fixture
def evil(tmp_path, monkeypatch, clean):
    """A plugin claiming built-in names, next to the built-ins it clashes with; returns a function that
    puts its entry point ``"first"`` or ``"last"``."""
    install_fake_dist(tmp_path, EVIL, {"fp_evil": "cpfake_evil"})
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    real = importlib.metadata.entry_points
    monkeypatch.setenv(plugins.PLUGINS_ENV_VAR, ",".join(("fp_evil", *BUILTINS_USED)))
    monkeypatch.delenv(plugins.PREFER_ENV_VAR, raising=False)

    def order(where: str) -> None:
        def entry_points(**kw):
            eps = list(real(**kw))
            fake = [ep for ep in eps if ep.name == "fp_evil"]
            rest = [ep for ep in eps if ep.name != "fp_evil"]
            return fake + rest if where == "first" else rest + fake

        monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
        sys.modules.pop("cpfake_evil", None)
        reset_registry()

    yield order
    sys.modules.pop("cpfake_evil", None)


@pytest.mark.parametrize("where", ["first", "last"])
def test_a_plugin_cannot_take_a_built_in_name_whatever_the_load_order(evil, where):
    evil(where)
    reg = get_registry()
    (adapters, models, tasks, interventions, infos), msgs = collect(lambda: load_everything(reg))
    by_name = {a.name: a for a in adapters}
    assert type(by_name["transformers"]).__module__.startswith("crosspatch.adapters.transformers")
    assert type(models["ioi-gpt2-tiny"]).__module__.startswith("crosspatch.")
    assert type(tasks["ioi"]).__module__.startswith("crosspatch.zoo.tasks")
    assert interventions["das_rotation"].__module__ == "crosspatch.trainable.das"
    assert "evil-extra" in by_name  # adding a name is fine
    assert [a.name for a in adapters][-1] == "evil-extra"  # built-in adapters are asked first
    info = {i.name: i for i in infos}
    assert info["fp_evil"].registered == {"adapters": ["evil-extra"]}
    assert info["transformers"].builtin and not info["fp_evil"].builtin
    assert "transformers" in info["transformers"].registered["adapters"]
    assert info["transformers"].errors == [] and info["tasks"].errors == []
    # one warning per clash, each naming the plugin that lost and how to prefer it
    assert len(msgs) == 4, msgs
    for noun, name in (("adapter", "transformers"), ("model", "ioi-gpt2-tiny"), ("task", "ioi"),
                       ("intervention", "das_rotation")):
        (msg,) = [m for m in msgs if f"registered {noun} '{name}'" in m]
        assert msg.startswith("plugin 'fp_evil' (fakeplug 0.1) registered")
        assert "built-in" in msg and "dropped" in msg and f"CROSSPATCH_PREFER=fp_evil:{name}" in msg
    assert sorted(info["fp_evil"].errors) == sorted(msgs)
    assert reg.owner("adapters", "transformers") == "transformers"


def test_prefer_lets_the_user_pick_a_plugin_over_a_built_in(evil, monkeypatch):
    monkeypatch.setenv(plugins.PREFER_ENV_VAR, "fp_evil:transformers, fp_evil:ioi")
    evil("last")
    reg = get_registry()
    (adapters, models, tasks, _ivs, infos), msgs = collect(lambda: load_everything(reg))
    assert type(adapters[0]).__module__ == "cpfake_evil" and adapters[0].name == "transformers"  # asked first
    assert type(tasks["ioi"]).__module__ == "cpfake_evil"
    assert type(models["ioi-gpt2-tiny"]).__module__ != "cpfake_evil"  # not preferred: the built-in stays
    assert not any("adapter 'transformers'" in m or "task 'ioi'" in m for m in msgs)  # asked for: no warning
    info = {i.name: i for i in infos}
    assert "transformers" not in info["transformers"].registered.get("adapters", [])
    assert set(info["fp_evil"].registered["adapters"]) == {"transformers", "evil-extra"}


def test_prefer_star_takes_every_name_of_the_plugin(evil, monkeypatch):
    monkeypatch.setenv(plugins.PREFER_ENV_VAR, "fp_evil:*")
    evil("first")
    reg = get_registry()
    (adapters, models, tasks, interventions, _infos), msgs = collect(lambda: load_everything(reg))
    assert msgs == []
    assert type(models["ioi-gpt2-tiny"]).__module__ == "cpfake_evil"
    assert interventions["das_rotation"].__module__ == "cpfake_evil"
    assert [a.name for a in adapters][:2] == ["transformers", "evil-extra"]


def test_malformed_prefer_warns_and_is_ignored(clean, monkeypatch):
    monkeypatch.setenv(plugins.PREFER_ENV_VAR, "nocolon")
    reg = Registry(entry_points=False)
    _, msgs = collect(reg.adapters)
    assert len(msgs) == 1 and "'nocolon'" in msgs[0] and "plugin:name" in msgs[0]


def test_between_plugins_the_first_wins_and_the_loser_is_named():
    class P:
        def __init__(self):
            @hookimpl
            def register_models(register):
                register(_Named("m"))

            self.register_models = register_models

    reg = Registry(entry_points=False)
    reg.register(P(), "early")
    reg.register(P(), "late")
    models, msgs = collect(reg.models)
    assert reg.owner("models", "m") == "early"
    (msg,) = msgs
    assert msg.startswith("plugin 'late' registered model 'm'") and "first one loaded" in msg


# -- an adapter whose matches() raises is skipped ------------------------------------------------


class _Raising:
    name = "raises"

    def __init__(self, exc: BaseException):
        self.exc = exc

    def matches(self, model):
        raise self.exc


def test_matches_that_raises_is_a_warning_naming_the_adapter_and_plugin():
    adapter = _Raising(ZeroDivisionError("bad plugin"))

    class P:
        @hookimpl
        def register_adapters(self, register):
            register(adapter)

    reg = Registry(entry_points=False)
    reg.register(P(), "shaky")
    reg.adapters()
    ok, msgs = collect(lambda: plugins.matches(adapter, object(), reg))
    assert ok is False
    (msg,) = msgs
    assert "adapter 'raises' of plugin 'shaky'" in msg and "ZeroDivisionError: bad plugin" in msg
    assert "builtins.object" in msg and "skipped" in msg
    _, msgs = collect(lambda: plugins.matches(_Raising(SystemExit(3)), object(), reg))
    assert "SystemExit: 3" in msgs[0]
    with pytest.raises(KeyboardInterrupt):
        plugins.matches(_Raising(KeyboardInterrupt()), object(), reg)


# -- interrupts and exits while plugins load -------------------------------------------------------

MOODY = {
    "cpfake_moody_import": '''
        import os
        from crosspatch.hookspecs import hookimpl
        if os.environ.get("CPFAKE_MOOD") == "import-interrupt":
            raise KeyboardInterrupt
        if os.environ.get("CPFAKE_MOOD") == "import-exit":
            raise SystemExit(4)

        class A:
            name = "moody-a"

        @hookimpl
        def register_adapters(register):
            register(A())
    ''',
    "cpfake_moody_hook": '''
        import os, sys
        from crosspatch.hookspecs import hookimpl

        class T:
            name = "moody-task"

        @hookimpl
        def register_tasks(register):
            register(T())
            if os.environ.get("CPFAKE_MOOD") == "hook-interrupt":
                raise KeyboardInterrupt
            if os.environ.get("CPFAKE_MOOD") == "hook-exit":
                sys.exit(3)
    ''',
    "cpfake_steady": '''
        from crosspatch.hookspecs import hookimpl

        class S:
            name = "steady-task"

        @hookimpl
        def register_tasks(register):
            register(S())
    ''',
}
MOODY_EPS = {"fp_steady": "cpfake_steady", "fp_moody_import": "cpfake_moody_import", "fp_moody_hook": "cpfake_moody_hook"}


@pytest.fixture
def moody(tmp_path, monkeypatch, clean):
    install_fake_dist(tmp_path, MOODY, MOODY_EPS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv(plugins.PLUGINS_ENV_VAR, ",".join(MOODY_EPS))
    importlib.invalidate_caches()
    for mod in MOODY:
        sys.modules.pop(mod, None)
    yield monkeypatch
    for mod in MOODY:
        sys.modules.pop(mod, None)


@pytest.mark.parametrize("mood", ["import-interrupt", "hook-interrupt"])
def test_an_interrupted_load_is_not_remembered(moody, mood):
    moody.setenv("CPFAKE_MOOD", mood)
    reg = get_registry()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(KeyboardInterrupt):
            reg.plugins()
    plugin = "fp_moody_import" if mood == "import-interrupt" else "fp_moody_hook"
    (msg,) = [str(w.message) for w in caught]
    assert f"plugin {plugin!r}" in msg and "interrupted" in msg and "again" in msg
    moody.delenv("CPFAKE_MOOD")
    (adapters, _models, tasks, *_), msgs = collect(lambda: load_everything(reg))
    assert msgs == []
    assert [a.name for a in adapters] == ["moody-a"]
    assert sorted(tasks) == ["moody-task", "steady-task"]
    assert {i.name: i.status for i in reg.plugins() if i.name in MOODY_EPS} == dict.fromkeys(MOODY_EPS, "ok")


@pytest.mark.parametrize("mood, plugin, what", [
    ("import-exit", "fp_moody_import", "failed to load: SystemExit: 4"),
    ("hook-exit", "fp_moody_hook", "failed in register_tasks: SystemExit: 3"),
])
def test_system_exit_from_a_plugin_is_its_failure(moody, mood, plugin, what):
    moody.setenv("CPFAKE_MOOD", mood)
    reg = get_registry()
    (_adapters, _models, tasks, *_rest, infos), msgs = collect(lambda: load_everything(reg))
    (msg,) = msgs
    assert f"plugin {plugin!r}" in msg and what in msg
    assert "steady-task" in tasks
    assert {i.name: i.status for i in infos}[plugin] in ("failed", "errors")


def test_plugins_command_lists_a_plugin_that_calls_sys_exit(moody, capsys):
    from crosspatch.cli import app

    moody.setenv("CPFAKE_MOOD", "hook-exit")
    assert app.main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "fp_steady" in out and "fp_moody_hook" in out
    assert "SystemExit: 3" in out


def test_plugins_command_interrupted_while_loading_exits_130(moody, capsys):
    from crosspatch.cli import app

    moody.setenv("CPFAKE_MOOD", "import-interrupt")
    assert app.main(["plugins"]) == 130
    err = capsys.readouterr().err
    assert "fp_moody_import" in err and "interrupted" in err


def test_an_interrupted_register_in_code_leaves_nothing_behind():
    class Interrupting:
        @hookimpl
        def register_adapters(self, register):
            register(_Named("half"))
            raise KeyboardInterrupt

    reg = Registry(entry_points=False)
    reg.adapters()  # adapters collected: register() collects from the new plugin at once
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(KeyboardInterrupt):
            reg.register(Interrupting(), "int")
    assert reg.adapters() == [] and reg.plugins() == []
    reg.register(types.ModuleType("again"), "int")  # the name is free again


def test_a_command_ended_by_system_exit_says_so(monkeypatch, capsys):
    from crosspatch.cli import app

    def exits(args):
        raise SystemExit(0)

    parser = app.build_parser()
    monkeypatch.setattr(app, "build_parser", lambda: parser)
    parser.set_defaults(func=exits)
    sub = next(a for a in parser._actions if a.dest == "command")
    sub.choices["plugins"].set_defaults(func=exits)
    assert app.main(["plugins"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "SystemExit(0)" in err and "'plugins'" in err
