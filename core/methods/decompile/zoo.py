"""Zoo entries of decompilation: small transformers trained here on algorithmic tasks.

``<task>-transformer`` (``parity-last2-transformer`` ...): a 2-layer, 2-head GPT-2 (d_model 64)
trained on the task's per-step outputs (:mod:`.trained`); ``zoo.load(name).info`` holds its
held-out accuracy and training time, ``info["task"]`` the task it learned.
"""

from __future__ import annotations

from pathlib import Path

from ...plugins.hookspecs import hookimpl
from ...zoo.store import Loaded, TrainSettings, ZooModel
from .trained import DECOMPILE_TASKS, Recipe, load_transformer, save_transformer, train_transformer

__all__ = ["DECOMPILE_ZOO", "register_models"]


def _build(task: str):
    def build(folder: Path, settings: TrainSettings) -> dict:
        model, metrics = train_transformer(task, Recipe(), seed=settings.seed, steps=settings.steps,
                                           progress=settings.progress)
        save_transformer(model, metrics, folder)
        return metrics

    return build


def _load(folder: Path | None) -> Loaded:
    model, metrics = load_transformer(folder)
    return Loaded(model, None, dict(metrics))


def _entry(task: str) -> ZooModel:
    return ZooModel(
        name=f"{task}-transformer",
        description=f"2-layer GPT-2 (2 heads, d_model 64) trained here on the algorithmic task {task} (for decompilation)",
        adapter="transformers",
        task=task,
        build=_build(task),
        load=_load,
        version="1",
    )


DECOMPILE_ZOO: list[ZooModel] = [_entry(t) for t in DECOMPILE_TASKS]


@hookimpl
def register_models(register):
    for spec in DECOMPILE_ZOO:
        register(spec)
