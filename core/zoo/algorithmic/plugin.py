"""Plugin hooks of the algorithmic tasks: the zoo's recurrent networks trained on them.

One zoo entry per task, ``rnn-<task>`` (``rnn-parity-last2``, ``rnn-add-mod-5`` …): its build runs
:func:`~crosspatch.zoo.algorithmic.search.search_rnn` (grow-then-bisect over the hidden size and MLP
width, then the L1 stage) with the seed of the build, and writes the network with
:func:`~crosspatch.zoo.algorithmic.checkpoint.save_task_rnn`; ``zoo.load("rnn-<task>").model`` is the
:class:`TaskRNN` and its ``info`` holds the search's record (success, shape, accuracy per length, the
accuracy beyond, parameters, seconds, every training run). A task the search does not solve still
builds, with ``success: false``: the network is the best found and says so. ``steps`` of the build, if
given, caps the Adam steps of each training run.
"""

from __future__ import annotations

from pathlib import Path

from ...plugins.hookspecs import hookimpl
from ..store import Loaded, TrainSettings, ZooModel
from .checkpoint import load_task_rnn, save_task_rnn
from .search import SearchConfig, search_rnn
from .tasks import ALGORITHMIC_TASKS, get_algorithmic_task

__all__ = ["RNN_ZOO", "ZOO_VERSION", "build_task_rnn", "register_models", "zoo_name"]

ZOO_VERSION = "1"


def zoo_name(task: str) -> str:
    """The zoo name of the network trained on ``task`` (a task name or MIPS name): ``rnn-<task>``."""
    return f"rnn-{get_algorithmic_task(task).name}"


def build_task_rnn(task: str, folder: Path, settings: TrainSettings, config: SearchConfig | None = None) -> dict:
    """Search and train the network of ``task`` into ``folder``; the search's metrics."""
    config = config or SearchConfig()
    if settings.steps is not None:
        config = SearchConfig(**{**config.to_dict(), "steps": int(settings.steps)})
    result = search_rnn(get_algorithmic_task(task), seed=settings.seed, config=config, progress=settings.progress)
    metrics = result.metrics()
    save_task_rnn(result.model, folder, info=metrics)
    return metrics


def _load(folder: Path | None) -> Loaded:
    model, info = load_task_rnn(Path(folder))
    keep = ("task", "success", "shape", "accuracy", "accuracy_by_length", "beyond_accuracy", "parameters",
            "nonzero_parameters", "seconds")
    return Loaded(model, None, {k: info[k] for k in keep if k in info})


def _entry(task_name: str) -> ZooModel:
    task = get_algorithmic_task(task_name)
    mips = f" (MIPS: {task.mips_name})" if task.mips_name else ""
    return ZooModel(
        name=f"rnn-{task.name}",
        description=f"smallest TaskRNN found by grow-then-bisect search for {task.name}{mips}: {task.description}",
        adapter="generic",
        task=task.name,
        build=lambda folder, settings: build_task_rnn(task.name, folder, settings),
        load=_load,
        version=ZOO_VERSION,
    )


RNN_ZOO: list[ZooModel] = [_entry(t.name) for t in ALGORITHMIC_TASKS]


@hookimpl
def register_models(register):
    for spec in RNN_ZOO:
        register(spec)
