"""Executors: where the independent shards of a study run.

    cp.activation_patching(model, clean, corrupt, "head_out.*[head=*]", metric)                  # local
    cp.activation_patching("ioi-gpt2-tiny", clean, corrupt, "head_out.*[head=*]", metric,
                           executor=RayExecutor(actors=4, num_gpus_per_actor=1))             # a Ray cluster

``executor="local"`` (the default) is the plain in-process run. Any :class:`Executor` instance cuts
the study into shards (:mod:`crosspatch.scale.sharding`), runs them on its workers, saves each finished
shard (:mod:`crosspatch.scale.shard_store`) and merges them into the Result the local run returns (:mod:`crosspatch.scale.dispatch`).
:class:`LocalExecutor` runs the shards in this process (resumable, no extra dependency);
``"ray"`` / :class:`~crosspatch.scale.ray_executor.RayExecutor` runs them on Ray actors.

A shard that raises is retried up to ``max_retries`` times; one that still fails ends the run with a
:class:`ShardError` naming the shard and the cause, after the shards already running have finished
and been saved. Re-running with the same arguments loads the saved shards and runs only the rest.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from .model_source import ModelSource

__all__ = ["Executor", "LocalExecutor", "Session", "ShardError"]

logger = logging.getLogger(__name__)

Describe = Callable[[Any], str]


class ShardError(RuntimeError):
    """A shard failed on every attempt. ``shard`` names it; ``saved`` is where finished shards are."""

    def __init__(self, message: str, shard: Any = None, cause: BaseException | str | None = None,
                 saved: Path | None = None):
        super().__init__(message)
        self.shard, self.cause, self.saved = shard, cause, saved


class Session:
    """Workers that hold the model, for the length of one study.

    ``call(fn, *args)`` runs ``fn(model, *args)`` on one worker; ``map(fn, common, tasks, describe)``
    runs ``fn(model, common, task)`` for every task and yields ``(task, output)`` as each finishes,
    retrying a failed task; a task that fails every attempt raises :class:`ShardError` once the
    tasks already running are in."""

    workers: int = 1

    def call(self, fn: Callable, *args: Any) -> Any:
        raise NotImplementedError

    def map(self, fn: Callable, common: Any, tasks: Sequence[Any], describe: Describe) -> Iterator[tuple[Any, Any]]:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class Executor:
    """Runs a study's shards. Options every executor shares:

    ``max_retries``: attempts after the first for a failing shard. ``checkpoint_dir``: where finished
    shards are saved (default ``<crosspatch cache>/shards``); ``keep_checkpoints`` keeps them after a
    successful merge. ``sites_per_shard`` / ``rows_per_shard``: the shard size (``None``: chosen from
    the number of workers)."""

    name = "executor"

    def __init__(self, *, max_retries: int = 2, checkpoint_dir: "str | Path | None" = None,
                 keep_checkpoints: bool = False, sites_per_shard: int | None = None,
                 rows_per_shard: int | None = None):
        if not isinstance(max_retries, int) or max_retries < 0:
            raise ValueError(f"max_retries must be an int >= 0, got {max_retries!r}")
        self.max_retries = max_retries
        self.checkpoint_dir = checkpoint_dir
        self.keep_checkpoints = keep_checkpoints
        self.sites_per_shard, self.rows_per_shard = sites_per_shard, rows_per_shard

    def open(self, source: ModelSource) -> Session:
        raise NotImplementedError


class _LocalSession(Session):
    def __init__(self, source: ModelSource, device: Any, max_retries: int):
        self.model = source.load(device)
        self.max_retries = max_retries

    def call(self, fn, *args):
        return fn(self.model, *args)

    def map(self, fn, common, tasks, describe):
        for task in tasks:
            for attempt in range(self.max_retries + 1):
                try:
                    output = fn(self.model, common, task)
                    break
                except Exception as exc:  # retried, then reported with the shard's name
                    logger.warning("%s failed on attempt %d of %d: %s: %s", describe(task), attempt + 1,
                                   self.max_retries + 1, type(exc).__name__, exc)
                    error = exc
            else:
                raise ShardError(
                    f"{describe(task)} failed on all {self.max_retries + 1} attempts: {type(error).__name__}: {error}",
                    task, error,
                ) from error
            yield task, output


class LocalExecutor(Executor):
    """The shards run one after another in this process, on one copy of the model (on ``device``)."""

    name = "local"

    def __init__(self, *, device: Any = None, **options: Any):
        super().__init__(**options)
        self.device = device

    def open(self, source: ModelSource) -> Session:
        return _LocalSession(source, self.device, self.max_retries)
