"""The four CLIP examples run end to end (on a two-step shapes-clip build) and write their plots and results."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest

from crosspatch.zoo import store as zoo
from crosspatch.adapters.open_clip import zoo as clip_zoo

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
RUNS = {
    "clip_vision_patching": (["--n", "8"], ["vision_patching.png", "vision_layers.json", "vision_heads.json"]),
    "clip_text_patching": (["--n", "8"], ["text_patching.png", "text_positions.json", "text_heads.json"]),
    "clip_decomposition": (["--n", "24"], ["direct_logit_attribution.png", "mean_ablation.png", "mean_ablation.json"]),
    "clip_textspan": (["--n", "32", "--library", "transformers"], ["textspan.png", "textspan.json", "factor_alignment.json"]),
}


@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory):
    """A two-step build cached where the examples look for the default one."""
    cache = tmp_path_factory.mktemp("cache")
    patch = pytest.MonkeyPatch()
    patch.setenv(zoo.CACHE_ENV_VAR, str(cache))
    patch.setattr(clip_zoo, "RECIPE", clip_zoo.Recipe(steps=2, batch_size=16, pool_images=64, eval_images=32))
    zoo.load("shapes-clip", progress=False)
    yield cache
    patch.undo()


@pytest.mark.parametrize("name", RUNS)
def test_example_writes_plots_and_results(name, tiny_build, tmp_path, monkeypatch, capsys):
    args, files = RUNS[name]
    out = tmp_path / name
    monkeypatch.setenv(zoo.CACHE_ENV_VAR, str(tiny_build))
    monkeypatch.setattr(sys, "argv", [name, "--out", str(out), *args])
    runpy.run_path(str(EXAMPLES / f"{name}.py"), run_name="__main__")
    for file in files:
        assert (out / file).stat().st_size > 0, file
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seconds"] >= 0
    assert "training" not in capsys.readouterr().out  # the cached build was used
