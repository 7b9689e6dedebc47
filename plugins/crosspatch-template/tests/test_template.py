"""Tests of the template adapter. Copy them with the template and keep the conformance class."""

from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path

import pytest
import torch

try:
    import crosspatch_template  # noqa: F401  (installed, e.g. `pip install -e .`)
except ImportError:  # not installed: test the package next to this folder
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import crosspatch as cp
from crosspatch.plugins import reset_registry
from crosspatch.testing import AdapterConformance
from crosspatch_template import MLPAdapter, MLPClassifier


def make_model() -> MLPClassifier:
    torch.manual_seed(0)
    return MLPClassifier(in_features=8, width=16, depth=3, classes=3).eval()


def make_inputs(seed: int = 0) -> torch.Tensor:
    return torch.randn(4, 8, generator=torch.Generator().manual_seed(seed))


class TestMLPConformance(AdapterConformance):
    """The conformance suite, one pytest test per check (catalog, shapes, self-patch, hooks, ...)."""

    adapter = MLPAdapter()  # explicit, so the tests pass before the plugin is installed

    def make_model(self):
        return make_model()

    def make_inputs(self):
        return make_inputs()


def test_catalog():
    cat = cp.wrap(make_model(), MLPAdapter()).sites()
    assert list(cat.families) == ["hidden_in", "hidden", "logits"]
    assert cat.family("hidden").layers == 3
    assert cat.family("hidden").axes == (cp.Axis("neuron", 16),)
    assert cat.family("logits").axes == (cp.Axis("class", 3),)


def test_hidden_is_the_block_output():
    model = make_model()
    x = make_inputs()
    cache = cp.wrap(model, MLPAdapter()).capture(x, ["hidden.*", "hidden_in.*"])
    with torch.no_grad():
        torch.testing.assert_close(cache["hidden.1"], model.blocks[1](cache["hidden_in.1"]))
        torch.testing.assert_close(cache["hidden_in.1"], cache["hidden.0"])


def test_patching_one_neuron():
    m = cp.wrap(make_model(), MLPAdapter())
    clean, corrupt = make_inputs(1), make_inputs(2)
    base = m.run(clean).output
    patched = m.run(clean, {"hidden.2[neuron=4]": cp.Patch(corrupt)}).output
    assert patched.shape == base.shape
    res = cp.activation_patching(m, clean, corrupt, "hidden.*[neuron=*]", metric=lambda out: out[:, 0], progress=False)
    assert res.values.shape == (3, 16)


def test_registered_through_the_entry_point(monkeypatch):
    try:
        importlib.metadata.distribution("crosspatch-template")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("not installed; `pip install .` to test the entry point")
    monkeypatch.delenv("CROSSPATCH_PLUGINS", raising=False)
    monkeypatch.delenv("CROSSPATCH_DISABLE_PLUGINS", raising=False)
    reset_registry()
    try:
        assert cp.wrap(make_model()).adapter.name == "mlp"
    finally:
        reset_registry()
