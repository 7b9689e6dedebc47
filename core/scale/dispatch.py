"""Run a study on an executor: plan it, cut it into shards, run the ones not saved yet, merge.

``resolve_executor`` turns ``"local"`` / ``"ray"`` into an :class:`~crosspatch.scale.executors.Executor`;
``dispatch`` is what a wrapped method (:mod:`crosspatch.scale.shardable`) calls for any executor but "local".
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

from ..progress import progress_bar
from .executors import Executor, LocalExecutor, ShardError
from .identity import Opaque
from .model_source import ModelSource
from .ray_executor import RayExecutor
from .shard_store import ShardStore, default_root, study_about, study_key
from .sharding import Study, merge, plan_study, run_shard, split

__all__ = ["resolve_executor", "dispatch"]

logger = logging.getLogger(__name__)

_WARNED: set[tuple[str, str]] = set()  # (method, cause) of studies already told they cannot resume


def resolve_executor(executor: "str | Executor") -> Executor:
    """``"local"`` / ``"ray"`` or an :class:`Executor` instance."""
    if isinstance(executor, Executor):
        return executor
    if executor == "local":
        return LocalExecutor()
    if executor == "ray":
        return RayExecutor()
    raise ValueError(
        f"executor must be 'local', 'ray' or an Executor instance (LocalExecutor(...), RayExecutor(...)), "
        f"got {executor!r}"
    )


def _open_store(ex: Executor, study: Study, source: ModelSource, method: str, shards: int):
    """The study's shard store and its ``about.json``; ``(None, None, reason)`` when the study cannot be
    described, so cannot promise a resume (said once per cause with a warning)."""
    try:
        identity = source.identity()
        key = study_key(study, identity)
    except Opaque as exc:
        reason = str(exc)
        if (method, reason) not in _WARNED:
            _WARNED.add((method, reason))
            warnings.warn(
                f"this {method} study cannot resume after a failure: {reason}. Saved shards are found by a "
                f"description of everything that decides the numbers, and this part cannot be described; give it "
                f"a to_dict() or use plain values. The study runs, but its finished shards are not saved.",
                UserWarning, stacklevel=4,
            )
        return None, None, reason
    store = ShardStore(ex.checkpoint_dir or default_root(), key)
    return store, study_about(study, method, identity, shards), None


def dispatch(executor: "str | Executor", method: str, arguments: dict[str, Any]):
    """Run ``method`` as shards on ``executor`` and merge them: the Result the local run returns.

    ``arguments`` are the method's own (``model``, ``clean``, ``corrupt``, ``sites``, ``metric`` and its
    keywords), as the method received them."""
    options = dict(arguments)
    model, clean, corrupt, sites, metric = (options.pop(k) for k in ("model", "clean", "corrupt", "sites", "metric"))
    normalize, progress = options.pop("normalize", False), options.pop("progress", None)
    ex = resolve_executor(executor)
    source = ModelSource(model)
    with ex.open(source) as session:
        study = session.call(plan_study, method, clean, corrupt, sites, metric, normalize, options)
        shards = split(study, session.workers, ex.sites_per_shard, ex.rows_per_shard)
        store, about, unresumable = _open_store(ex, study, source, method, len(shards))
        outputs = store.load(shards) if store is not None else {}
        if outputs:
            logger.info("resuming %s: %d of %d shards loaded from %s", method, len(outputs), len(shards), store.folder)
        todo = [s for s in shards if s.index not in outputs]
        stream = session.map(run_shard, study, todo, lambda s: s.describe(study))
        desc = f"{method}: {len(shards)} shards on {session.workers} {ex.name} worker(s)"
        try:
            for shard, output in progress_bar(stream, progress, total=len(shards), initial=len(outputs), desc=desc):
                if store is not None:
                    store.save(shard, output, about)
                outputs[shard.index] = output
        except ShardError as exc:
            if store is None:
                raise ShardError(
                    f"{exc} -- this study cannot resume ({unresumable}), so its {len(outputs)} finished shard(s) "
                    f"were not saved", exc.shard, exc.cause, None,
                ) from exc
            saved = len(store.saved())
            raise ShardError(
                f"{exc} -- {saved} of {len(shards)} shards are saved in {store.folder}; running the same study "
                f"again resumes from them", exc.shard, exc.cause, store.folder,
            ) from exc
    result = merge(study, shards, outputs)
    if store is not None and not ex.keep_checkpoints:
        store.clear()
        for folder in store.leftovers(about, source.older_identities()):
            logger.info("removing %s: an earlier run of this study left it under an older key format, "
                        "which cannot resume", folder)
            ShardStore(folder.parent, folder.name).clear()
    return result
