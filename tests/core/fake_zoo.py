"""A fake text zoo model for tests: an untrained 2-layer GPT-2 with the word-level IOI tokenizer,
registered through a plugin, that "trains" in a blink into a temporary cache."""

from __future__ import annotations

import types
from pathlib import Path

import pytest

from crosspatch.plugins.registry import get_registry, reset_registry

FAKE = "fake-ioi-tiny"


def build(folder: Path, settings) -> dict:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from crosspatch.adapters.transformers.zoo import word_tokenizer
    from crosspatch.zoo.tasks import IOITask

    tokenizer = word_tokenizer(IOITask().vocabulary())
    torch.manual_seed(settings.seed)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=16, n_positions=32, vocab_size=len(tokenizer))
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return {"accuracy": 0.0, "steps": 1, "train_seconds": 0.01, "note": "untrained"}


def plugin() -> types.ModuleType:
    from crosspatch.adapters.transformers.zoo import load_gpt2
    from crosspatch.plugins.hookspecs import hookimpl
    from crosspatch.zoo.store import ZooModel

    module = types.ModuleType("fake_zoo_plugin")

    @hookimpl
    def register_models(register):
        register(ZooModel(FAKE, "tiny untrained GPT-2 for tests", "transformers", "ioi", build, load_gpt2))

    module.register_models = register_models
    return module


@pytest.fixture
def fake_zoo(tmp_path, monkeypatch):
    """The registry with the fake model added, and a temporary zoo cache; yields the temporary folder."""
    monkeypatch.setenv("CROSSPATCH_CACHE", str(tmp_path / "cache"))
    reset_registry()
    get_registry().register(plugin(), "fake-zoo")
    yield tmp_path
    reset_registry()
