"""Zoo entries: transcoders for the zoo's task models, trained here in minutes (``ioi-gpt2-tiny-transcoders`` ...).

Each entry loads its base zoo model, runs the task's training prompts (clean and corrupt), collects
``mlp_in.L`` -> ``mlp_out.L`` pairs at every real token and trains a per-layer JumpReLU transcoder over
every layer; its build records the reconstruction FVU (overall and per layer), the L0 per layer and
the same on the task's held-out test prompts. ``zoo.load(name).model`` is the :class:`Transcoder`,
whose ``metadata["base"]`` names the model it reads. :func:`register_models` is the plugin hook.
"""

from __future__ import annotations

import time
from pathlib import Path

from ...plugins.hookspecs import hookimpl
from ...trainable.transcoder import collect_pairs, load_transcoder, train_transcoder
from ...zoo.store import Loaded, TrainSettings, ZooModel
from ...zoo.store import load as zoo_load
from ...zoo.tasks import get_task

__all__ = ["TRANSCODER_ZOO", "register_models", "build_transcoders"]

_FOLDER = "transcoder"
_TRAIN_PROMPTS, _TEST_PROMPTS = 400, 100
_DEFAULT_STEPS = 1500


def _prompts(task_name: str, n: int, split: str, seed: int) -> list[str]:
    pairs = get_task(task_name).pairs(n, seed=seed, split=split)
    return [p.clean for p in pairs] + [p.corrupt for p in pairs]


def build_transcoders(base: str, task: str, folder: Path, settings: TrainSettings, *, n_features: int = 256,
                      base_steps: int | None = None) -> dict:
    """Train the per-layer transcoder of zoo model ``base`` on ``task``'s prompts into ``folder``."""
    import crosspatch as cp

    loaded = zoo_load(base, seed=settings.seed, steps=base_steps, progress=settings.progress)
    m = cp.wrap(loaded.model, tokenizer=loaded.tokenizer)
    layers = int(m.catalog.family("mlp_out").layers or 0)
    ins, outs = [f"mlp_in.{L}" for L in range(layers)], [f"mlp_out.{L}" for L in range(layers)]
    start = time.perf_counter()
    xs, ys = collect_pairs(m, _prompts(task, _TRAIN_PROMPTS, "train", settings.seed), ins, outs)
    steps = settings.steps or _DEFAULT_STEPS
    tc = train_transcoder(xs, ys, n_features, ins, outs, kind="jumprelu", steps=steps, seed=settings.seed,
                          progress=settings.progress, metadata={"base": base, "task": task})
    seconds = time.perf_counter() - start
    tx, ty = collect_pairs(m, _prompts(task, _TEST_PROMPTS, "test", settings.seed), ins, outs)
    test = tc.evaluate(tx, ty)
    tc.metadata["test"] = test
    tc.save(folder / _FOLDER)
    train = tc.metadata["train"]
    return {
        "base": base, "task": task, "n_features": n_features, "kind": "jumprelu", "cross_layer": False,
        "fvu": train["fvu"], "fvu_per_layer": train["fvu_per_output"], "l0_per_layer": train["l0_per_source"],
        "test_fvu": test["fvu"], "test_fvu_per_layer": test["fvu_per_output"], "steps": steps,
        "train_rows": train["rows"], "train_seconds": round(seconds, 2),
    }


def _load(folder: Path | None) -> Loaded:
    tc = load_transcoder(Path(folder) / _FOLDER)
    return Loaded(tc, None, {"base": tc.metadata.get("base"), "fvu": tc.metadata.get("train", {}).get("fvu"),
                             "test_fvu": tc.metadata.get("test", {}).get("fvu")})


def _entry(base: str, task: str) -> ZooModel:
    return ZooModel(
        name=f"{base}-transcoders",
        description=f"per-layer JumpReLU transcoders (256 features a layer) of {base}, trained here on {task} prompts",
        adapter="transformers",
        task=task,
        build=lambda folder, settings: build_transcoders(base, task, folder, settings),
        load=_load,
        version="1",
    )


TRANSCODER_ZOO: list[ZooModel] = [_entry("ioi-gpt2-tiny", "ioi"), _entry("greater-than-tiny", "greater-than")]


@hookimpl
def register_models(register):
    for spec in TRANSCODER_ZOO:
        register(spec)
