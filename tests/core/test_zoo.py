"""The zoo's cache: build once, reload, detect partial and corrupted folders, rebuild on version bumps."""

from __future__ import annotations

import dataclasses
import json
import logging
import types
from pathlib import Path

import pytest
import torch

from crosspatch.plugins import registry as plugins
from crosspatch.zoo import store as zoo
from crosspatch.plugins.hookspecs import hookimpl
from crosspatch.plugins.registry import get_registry, reset_registry
from crosspatch.zoo.store import Loaded, TrainSettings, ZooError, ZooModel


class FakeBuilds:
    """A zoo model that 'trains' a Linear(2, 2) from the seed and counts builds and loads."""

    def __init__(self, name: str = "fake-tiny", version: str = "1"):
        self.builds: list[TrainSettings] = []
        self.loads: list[Path | None] = []
        self.before_rename = None  # hook for the concurrency test
        self.spec = ZooModel(
            name=name, description="a fake model", adapter="none", task=None,
            build=self.build, load=self.load, version=version,
        )

    def build(self, folder: Path, settings: TrainSettings) -> dict:
        self.builds.append(settings)
        number = len(self.builds)  # before the hook: a nested build counts after this one
        assert folder.is_dir() and not any(folder.iterdir()), "build gets an empty folder"
        torch.manual_seed(settings.seed)
        layer = torch.nn.Linear(2, 2)
        torch.save(layer.state_dict(), folder / "weights.pt")
        (folder / "sub").mkdir()
        (folder / "sub" / "notes.txt").write_text(f"seed {settings.seed} steps {settings.steps}\n")
        if self.before_rename is not None:
            hook, self.before_rename = self.before_rename, None
            hook()
        return {"accuracy": 0.5 + number, "steps": settings.steps or 7}

    def load(self, folder: Path | None) -> Loaded:
        self.loads.append(folder)
        layer = torch.nn.Linear(2, 2)
        layer.load_state_dict(torch.load(folder / "weights.pt"))
        return Loaded(layer.eval(), None, {"loaded_from": str(folder)})


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(zoo.CACHE_ENV_VAR, str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def fake(cache, monkeypatch):
    """A fake model the zoo sees through ``models()`` (the registry path has its own test)."""
    entry = FakeBuilds()
    table = {entry.spec.name: entry.spec}
    monkeypatch.setattr(zoo, "models", lambda: dict(table))
    entry.table = table
    return entry


def _folder(cache: Path, name="fake-tiny", leaf="v1-seed0") -> Path:
    return cache / "zoo" / name / leaf


def _leftovers(cache: Path, name="fake-tiny") -> list[str]:
    return [p.name for p in (cache / "zoo" / name).iterdir() if p.name.startswith(".")]


# -- the cache directory --------------------------------------------------------


def test_cache_dir_env_override(monkeypatch, tmp_path):
    monkeypatch.setenv("CROSSPATCH_CACHE", str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert zoo.cache_dir() == tmp_path / "mine"


def test_cache_dir_xdg_then_home(monkeypatch, tmp_path):
    monkeypatch.delenv("CROSSPATCH_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert zoo.cache_dir() == tmp_path / "xdg" / "crosspatch"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert zoo.cache_dir() == tmp_path / "home" / ".cache" / "crosspatch"


# -- build once, reload ------------------------------------------------------------


def test_builds_once_then_reloads(fake, cache):
    assert not zoo.cached("fake-tiny")
    first = zoo.load("fake-tiny")
    assert len(fake.builds) == 1 and len(fake.loads) == 1
    assert zoo.cached("fake-tiny")
    second = zoo.load("fake-tiny")
    assert len(fake.builds) == 1 and len(fake.loads) == 2
    torch.testing.assert_close(first.model.weight, second.model.weight)

    folder = _folder(cache)
    assert second.info["path"] == str(folder) and second.info["loaded_from"] == str(folder)
    assert second.info["accuracy"] == 1.5 and second.info["seed"] == 0
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["name"] == "fake-tiny" and manifest["version"] == "1"
    assert manifest["seed"] == 0 and manifest["steps"] is None
    assert manifest["metrics"] == {"accuracy": 1.5, "steps": 7}
    assert set(manifest["files"]) == {"weights.pt", "sub/notes.txt"}
    assert manifest["files"]["weights.pt"]["size"] == (folder / "weights.pt").stat().st_size
    assert len(manifest["files"]["weights.pt"]["sha256"]) == 64
    assert manifest["crosspatch"]
    assert _leftovers(cache) == []


def test_seed_and_steps_are_separate_builds(fake, cache):
    a = zoo.load("fake-tiny", seed=0)
    b = zoo.load("fake-tiny", seed=1)
    c = zoo.load("fake-tiny", seed=1, steps=5)
    assert [(s.seed, s.steps) for s in fake.builds] == [(0, None), (1, None), (1, 5)]
    assert not torch.equal(a.model.weight, b.model.weight)
    assert sorted(p.name for p in (cache / "zoo" / "fake-tiny").iterdir()) == [
        "v1-seed0", "v1-seed1", "v1-seed1-steps5",
    ]
    assert c.info["steps"] == 5 and zoo.cached("fake-tiny", seed=1, steps=5)
    assert not zoo.cached("fake-tiny", seed=2)


def test_train_and_rebuild_always_build(fake, cache):
    zoo.load("fake-tiny")
    zoo.train("fake-tiny")
    zoo.load("fake-tiny", rebuild=True)
    assert len(fake.builds) == 3
    assert zoo.load("fake-tiny").info["accuracy"] == 3.5  # the latest build is the one in place
    assert len(fake.builds) == 3 and _leftovers(cache) == []


def test_device_and_dtype(fake):
    loaded = zoo.load("fake-tiny", dtype=torch.float64, device="cpu")
    assert loaded.model.weight.dtype == torch.float64
    assert zoo.load("fake-tiny").model.weight.dtype == torch.float32  # as saved


# -- partial and corrupted folders are rebuilt -------------------------------------


def _damage_truncate(folder: Path) -> None:
    data = (folder / "weights.pt").read_bytes()
    (folder / "weights.pt").write_bytes(data[: len(data) // 2])


def _damage_flip(folder: Path) -> None:  # same size, other bytes
    path = folder / "sub" / "notes.txt"
    text = path.read_text()
    path.write_text(text.replace("seed", "SEED"))


def _damage_no_manifest(folder: Path) -> None:
    (folder / "manifest.json").unlink()


def _damage_bad_manifest(folder: Path) -> None:
    (folder / "manifest.json").write_text("{not json")


def _damage_missing_file(folder: Path) -> None:
    (folder / "sub" / "notes.txt").unlink()


def _damage_other_seed(folder: Path) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["seed"] = 9
    (folder / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    "damage, problem",
    [
        (_damage_truncate, "weights.pt has"),
        (_damage_flip, "does not match its sha256"),
        (_damage_no_manifest, "partial (no manifest.json)"),
        (_damage_bad_manifest, "manifest.json unreadable"),
        (_damage_missing_file, "sub/notes.txt is missing"),
        (_damage_other_seed, "seed=9"),
    ],
)
def test_damaged_cache_is_rebuilt_with_a_warning(fake, cache, caplog, damage, problem):
    zoo.load("fake-tiny")
    folder = _folder(cache)
    damage(folder)
    assert not zoo.cached("fake-tiny")
    with caplog.at_level(logging.WARNING, logger="crosspatch.zoo.store"):
        loaded = zoo.load("fake-tiny")
    assert len(fake.builds) == 2
    warning = "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert str(folder) in warning and "rebuilding" in warning and problem in warning
    assert zoo.cached("fake-tiny") and loaded.info["accuracy"] == 2.5
    assert _leftovers(cache) == []


def test_folder_without_manifest_from_an_interrupted_build(fake, cache, caplog):
    folder = _folder(cache)
    folder.mkdir(parents=True)
    (folder / "weights.pt").write_bytes(b"half a file")
    with caplog.at_level(logging.WARNING, logger="crosspatch.zoo.store"):
        zoo.load("fake-tiny")
    assert len(fake.builds) == 1 and "partial" in caplog.text
    assert zoo.cached("fake-tiny")


def test_a_file_where_the_folder_should_be(fake, cache):
    folder = _folder(cache)
    folder.parent.mkdir(parents=True)
    folder.write_text("not a folder")
    zoo.load("fake-tiny")
    assert folder.is_dir() and zoo.cached("fake-tiny") and _leftovers(cache) == []


def test_load_failure_on_an_intact_folder_rebuilds_once(fake, cache, caplog):
    zoo.load("fake-tiny")
    calls = []
    real = fake.load

    def flaky(folder):
        calls.append(folder)
        if len(calls) == 1:
            raise RuntimeError("weights from an older library")
        return real(folder)

    fake.table["fake-tiny"] = dataclasses.replace(fake.spec, load=flaky)
    with caplog.at_level(logging.WARNING, logger="crosspatch.zoo.store"):
        zoo.load("fake-tiny")
    assert len(fake.builds) == 2 and len(calls) == 2
    assert "weights from an older library" in caplog.text


def test_version_bump_rebuilds(fake, cache):
    zoo.load("fake-tiny")
    fake.table["fake-tiny"] = dataclasses.replace(fake.spec, version="2")
    assert not zoo.cached("fake-tiny")
    loaded = zoo.load("fake-tiny")
    assert len(fake.builds) == 2
    assert loaded.info["path"] == str(_folder(cache, leaf="v2-seed0"))
    assert loaded.info["version"] == "2"
    zoo.load("fake-tiny")
    assert len(fake.builds) == 2


def test_failed_build_leaves_nothing(fake, cache):
    def broken(folder, settings):
        (folder / "half.bin").write_bytes(b"x")
        raise RuntimeError("out of patience")

    fake.table["fake-tiny"] = dataclasses.replace(fake.spec, build=broken)
    with pytest.raises(RuntimeError, match="out of patience"):
        zoo.load("fake-tiny")
    assert list((cache / "zoo" / "fake-tiny").iterdir()) == []
    assert not zoo.cached("fake-tiny")


@pytest.mark.parametrize("result", [None, {}])
def test_build_that_writes_nothing_is_an_error(fake, cache, result):
    fake.table["fake-tiny"] = dataclasses.replace(fake.spec, build=lambda folder, settings: result)
    with pytest.raises(ZooError, match="wrote no files"):
        zoo.load("fake-tiny")
    assert list((cache / "zoo" / "fake-tiny").iterdir()) == []


def test_another_process_finishing_first_wins(fake, cache):
    """While our build runs, another one completes and renames into place: ours is dropped, its is used."""
    fake.before_rename = lambda: zoo.load("fake-tiny")  # the 'other process' builds and installs first
    loaded = zoo.load("fake-tiny")
    assert len(fake.builds) == 2
    assert loaded.info["accuracy"] == 2.5  # the inner build got there first (second build call, first rename)
    assert zoo.cached("fake-tiny") and _leftovers(cache) == []


# -- names, registry, pretrained entries ---------------------------------------------


def test_unknown_name_lists_the_zoo(fake):
    with pytest.raises(ZooError) as info:
        zoo.load("no-such-model")
    message = str(info.value)
    assert "no-such-model" in message and "fake-tiny" in message
    assert isinstance(info.value, LookupError)
    with pytest.raises(ZooError, match="no-such-model"):
        zoo.cached("no-such-model")


def test_pretrained_entry_loads_without_building(cache, monkeypatch):
    seen = []

    def load(folder):
        seen.append(folder)
        return Loaded(torch.nn.Linear(2, 2), "tok", {"source": "package"})

    spec = ZooModel("packaged", "pretrained from a package", "none", None, build=None, load=load, trains=False)
    monkeypatch.setattr(zoo, "models", lambda: {"packaged": spec})
    assert zoo.cached("packaged")
    loaded = zoo.load("packaged", dtype=torch.float64)
    assert seen == [None] and loaded.tokenizer == "tok" and loaded.info["source"] == "package"
    assert loaded.model.weight.dtype == torch.float64
    with pytest.raises(ZooError, match="nothing to train"):
        zoo.train("packaged")
    assert not cache.exists()


def test_a_trained_entry_needs_a_build():
    with pytest.raises(ValueError, match="no build"):
        ZooModel("x", "d", "none", None, build=None, load=lambda folder: None)


def test_bad_seed_and_steps(fake):
    with pytest.raises(ValueError, match="steps"):
        zoo.load("fake-tiny", steps=0)
    with pytest.raises(TypeError, match="seed"):
        zoo.load("fake-tiny", seed="1")


@pytest.fixture
def registry_only_fake(cache, monkeypatch):
    """The process registry without entry points, plus a fake plugin module registering a zoo model."""
    monkeypatch.setenv(plugins.PLUGINS_ENV_VAR, "")
    reset_registry()
    entry = FakeBuilds("fake-registered")
    module = types.ModuleType("cpfake_zoo_plugin")

    @hookimpl
    def register_models(register):
        register(entry.spec)

    module.register_models = register_models
    get_registry().register(module, "cpfake_zoo_plugin")
    yield entry
    reset_registry()


def test_models_come_from_the_plugin_registry(registry_only_fake, cache):
    assert list(zoo.models()) == ["fake-registered"]
    assert zoo.get("fake-registered") is registry_only_fake.spec
    zoo.load("fake-registered")
    zoo.load("fake-registered")
    assert len(registry_only_fake.builds) == 1 and len(registry_only_fake.loads) == 2
    info = next(p for p in get_registry().plugins() if p.name == "cpfake_zoo_plugin")
    assert info.registered == {"models": ["fake-registered"]}
    with pytest.raises(ZooError, match="fake-registered"):
        zoo.get("nope")
