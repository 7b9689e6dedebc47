"""The VAE zoo entries: registered through the plugin, built in a few steps, cached and reloaded."""

from __future__ import annotations

import pytest
import torch

import crosspatch as cp
from crosspatch.zoo import store as zoo
from crosspatch.adapters.vae import ConvVAE
from crosspatch.adapters.vae import zoo as vae_zoo
from crosspatch.zoo.tasks import ShapesTask


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CROSSPATCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def counting(monkeypatch):
    """Record every build the zoo runs (it builds through ``zoo._build``)."""
    calls = []
    real = zoo._build

    def build(spec, folder, settings, *, replace):
        calls.append((spec.name, settings.seed, settings.steps))
        return real(spec, folder, settings, replace=replace)

    monkeypatch.setattr(zoo, "_build", build)
    return calls


def test_registered_through_the_plugin():
    models = zoo.models()
    for name in ("shapes-vae", "shapes-vae-beta1", "shapes-vae-kl"):
        assert models[name].adapter == "vae" and models[name].task == "shapes"


def test_conv_vae_round_trips_through_the_cache(cache, monkeypatch):
    calls = counting(monkeypatch)
    first = zoo.load("shapes-vae-beta1", steps=3, seed=1)
    assert len(calls) == 1 and zoo.cached("shapes-vae-beta1", seed=1, steps=3)
    model = first.model
    assert isinstance(model, ConvVAE) and not model.training
    info = first.info
    assert info["beta"] == 1.0 and info["steps"] == 3 and len(info["kl_per_latent"]) == 8
    assert {"recon_mse_train", "recon_mse_test", "train_seconds", "active_latents"} <= set(info)
    again = zoo.load("shapes-vae-beta1", steps=3, seed=1)
    assert len(calls) == 1  # loaded from the cache, not trained again
    for (k, a), (_, b) in zip(model.state_dict().items(), again.model.state_dict().items()):
        assert torch.equal(a, b), k
    m = cp.wrap(again.model)
    assert m.adapter.name == "vae" and "latent.z" in m.sites()
    # seeded: a rebuild gives the same weights
    rebuilt = zoo.train("shapes-vae-beta1", steps=3, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), rebuilt.model.state_dict().values()))


def test_beta_is_a_recipe_setting(cache, tmp_path):
    recipe = vae_zoo.VAERecipe(beta=2.5, steps=2, latent_dim=6)
    (tmp_path / "b").mkdir()
    metrics = vae_zoo.build_conv_vae(tmp_path / "b", zoo.TrainSettings(seed=0), recipe)
    assert metrics["beta"] == 2.5
    loaded = vae_zoo.load_conv_vae(tmp_path / "b")
    assert loaded.model.latent_dim == 6 and loaded.info["beta"] == 2.5


def test_autoencoder_kl_round_trips_through_the_cache(cache, monkeypatch):
    calls = counting(monkeypatch)
    first = zoo.load("shapes-vae-kl", steps=2)
    vae = first.model
    assert type(vae).__name__ == "AutoencoderKL" and vae.config.latent_channels == 4
    assert len(first.info["kl_per_latent"]) == 4
    again = zoo.load("shapes-vae-kl", steps=2)
    assert calls == [("shapes-vae-kl", 0, 2)]
    x = ShapesTask().sample(2, seed=3).images
    m = cp.wrap(again.model)
    with torch.no_grad():
        close = torch.testing.assert_close
        close(m.run(x).output, vae.decode(vae.encode(x).latent_dist.mean).sample)
    assert m.sites().family("decoder.mid.head_out").axis("head").size == 1
