"""The VAE and CLIP zoo folders, written and read through crosspatch.results.tensor_folder: the bytes are
those the zoo modules wrote with safetensors and json themselves (the old writer is restated here as the
oracle), and every folder in the user's zoo cache reloads and re-saves to the same bytes."""

from __future__ import annotations

import json
from dataclasses import asdict, fields

import pytest
import torch
from safetensors.torch import load_file, save_file

from crosspatch.adapters.vae import zoo as vae_zoo
from crosspatch.adapters.vae.models import ConvVAE
from crosspatch.zoo import store as zoo

CONV_FILES = ("crosspatch_vae.json", "model.safetensors")
CLIP_FILES = ("open_clip_config.json", "open_clip_model.safetensors")


def _randomized(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return module


def _old_writer(folder, config_name, weights_name, config, model, *, sort_keys):
    """What the zoo modules wrote before tensor_folder: json.dumps indented by 2, then save_file."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / config_name).write_text(json.dumps(config, indent=2, sort_keys=sort_keys), encoding="utf-8")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / weights_name))


def _same_files(a, b, names) -> None:
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def _same_state(module: torch.nn.Module, tensors: dict) -> None:
    state = module.state_dict()
    assert sorted(state) == sorted(tensors)
    for name, value in tensors.items():
        assert state[name].dtype == value.dtype and torch.equal(state[name], value), name


def _vae_recipe(recipe: dict) -> vae_zoo.VAERecipe:
    types = {f.name: f.type for f in fields(vae_zoo.VAERecipe)}
    return vae_zoo.VAERecipe(**{k: tuple(v) if "tuple" in str(types[k]) else v for k, v in recipe.items()})


def test_conv_vae_folder_has_the_old_bytes_and_loads(tmp_path):
    recipe = vae_zoo.VAERecipe(latent_dim=3, channels=(4, 4, 8), hidden=16, beta=2.5)
    model = _randomized(ConvVAE(recipe.latent_dim, recipe.channels, recipe.hidden))
    vae_zoo.save_conv_vae(tmp_path / "new", model, recipe)
    _old_writer(tmp_path / "old", *CONV_FILES, {"kind": "conv_vae", "model": model.config, "recipe": asdict(recipe)},
                model, sort_keys=True)
    _same_files(tmp_path / "new", tmp_path / "old", CONV_FILES)
    loaded = vae_zoo.load_conv_vae(tmp_path / "old")
    assert isinstance(loaded.model, ConvVAE) and not loaded.model.training
    assert loaded.model.config == model.config and loaded.info["beta"] == 2.5
    _same_state(loaded.model, model.state_dict())


def test_conv_vae_folder_names_a_missing_file(tmp_path):
    model = ConvVAE(2, (4, 4, 4), 8)
    vae_zoo.save_conv_vae(tmp_path, model, vae_zoo.VAERecipe(latent_dim=2, channels=(4, 4, 4), hidden=8))
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        vae_zoo.load_conv_vae(tmp_path)


def test_clip_folder_has_the_old_bytes_and_open_clip_loads_it(tmp_path):
    open_clip = pytest.importorskip("open_clip")
    from crosspatch.adapters.open_clip import zoo as clip_zoo

    recipe = clip_zoo.Recipe(vision_layers=1, text_layers=1, vision_width=32, text_width=32, embed_dim=16)
    model = _randomized(open_clip.CLIP(**clip_zoo.model_config(recipe)), seed=1)
    clip_zoo.save_shapes_clip(tmp_path / "new", model, recipe)
    old_config = json.loads((tmp_path / "new" / clip_zoo.CONFIG_FILE).read_text(encoding="utf-8"))
    assert old_config["model_cfg"] == json.loads(json.dumps(clip_zoo.model_config(recipe)))
    _old_writer(tmp_path / "old", *CLIP_FILES, old_config, model, sort_keys=False)
    _same_files(tmp_path / "new", tmp_path / "old", CLIP_FILES)
    loaded = clip_zoo.load_shapes_clip(tmp_path / "new")
    _same_state(loaded.model, model.state_dict())


# ------------------------------------------------------------------ the folders in the user's zoo cache


def _cached(names: tuple[str, ...]) -> list:
    root = zoo.cache_dir() / "zoo"
    found = [leaf for name in names for leaf in sorted((root / name).glob("v*-seed*")) if leaf.is_dir()]
    return found or [pytest.param(None, marks=pytest.mark.skip(reason=f"no {'/'.join(names)} folder in {root}"))]


@pytest.mark.parametrize("folder", _cached(("shapes-vae", "shapes-vae-beta1")), ids=str)
def test_cached_conv_vae_reloads_and_resaves_byte_for_byte(folder, tmp_path):
    loaded = vae_zoo.load_conv_vae(folder)
    _same_state(loaded.model, load_file(str(folder / "model.safetensors")))
    config = json.loads((folder / "crosspatch_vae.json").read_text(encoding="utf-8"))
    vae_zoo.save_conv_vae(tmp_path, loaded.model, _vae_recipe(config["recipe"]))
    _same_files(tmp_path, folder, CONV_FILES)


@pytest.mark.parametrize("folder", _cached(("shapes-clip",)), ids=str)
def test_cached_clip_reloads_and_resaves_byte_for_byte(folder, tmp_path):
    pytest.importorskip("open_clip")
    from crosspatch.adapters.open_clip import zoo as clip_zoo

    loaded = clip_zoo.load_shapes_clip(folder)
    _same_state(loaded.model, load_file(str(folder / clip_zoo.WEIGHTS_FILE)))
    if not folder.name.startswith(f"v{zoo.get('shapes-clip').version}-"):
        pytest.skip(f"{folder} is of an earlier recipe version; its recipe is not kept")
    clip_zoo.save_shapes_clip(tmp_path, loaded.model, clip_zoo.RECIPE)
    _same_files(tmp_path, folder, CLIP_FILES)
