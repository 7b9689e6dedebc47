"""The Ray executor: shards run on Ray actors that each load the model once.

    from crosspatch.ray_executor import RayExecutor
    ex = RayExecutor(address="auto", actors=8, num_gpus_per_actor=1)
    res = cp.activation_patching("ioi-gpt2-tiny", clean, corrupt, "head_out.*[head=*]", metric, executor=ex)

Ray is imported only when a run starts (``pip install "crosspatch[ray]"``). With no running Ray
connection the executor calls ``ray.init(address=address, **init_options)`` (``address=None``
starts a local cluster on this machine) and leaves Ray up for the next study; it stops the actors
it started when the study ends. An actor that dies is replaced (it loads the model again) and its
shard retried; see :mod:`crosspatch.executors` for retries, errors and resume.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any

from .executors import Executor, Session, ShardError
from .model_source import ModelSource

__all__ = ["RayExecutor", "release_actors"]

logger = logging.getLogger(__name__)


def _ray():
    try:
        import ray
    except ImportError:
        raise ImportError(
            'executor="ray" needs Ray, which is an optional extra: pip install "crosspatch[ray]" '
            '(or use executor="local")'
        ) from None
    return ray


class _Worker:
    """One Ray actor: loads the model once, then runs ``fn(model, *args)`` for every call."""

    def __init__(self, source: ModelSource, device: Any, threads: int):
        import torch

        torch.set_num_threads(threads)
        self.model = source.load(device)

    def call(self, fn, *args):
        return fn(self.model, *args)

    def pid(self) -> int:
        import os

        return os.getpid()


class RayExecutor(Executor):
    """Shards on Ray actors.

    ``actors``: how many (default: as many as the cluster's CPUs, or GPUs when
    ``num_gpus_per_actor`` > 0, hold). ``address``: the cluster for ``ray.init`` when Ray is not
    initialised yet (``"auto"`` or ``"ray://host:10001"``; ``None`` starts a local one).
    ``num_cpus_per_actor`` / ``num_gpus_per_actor`` / ``resources``: what each actor reserves (the
    actor uses that many torch threads; with GPUs the model goes to ``cuda`` unless ``device`` says
    otherwise). ``init_options``: more ``ray.init`` keywords (``runtime_env``, ``num_cpus``...).
    ``keep_actors``: leave the actors running after the study, holding the model, for the next study
    on the same model with the same actor resources (by any RayExecutor with ``keep_actors`` in this
    process); :func:`release_actors` stops them.
    Plus the options of :class:`~crosspatch.executors.Executor` (``max_retries``, ``checkpoint_dir``...).
    """

    name = "ray"

    def __init__(self, actors: int | None = None, *, address: str | None = None, num_cpus_per_actor: float = 1,
                 num_gpus_per_actor: float = 0, resources: dict[str, float] | None = None, device: Any = None,
                 init_options: dict[str, Any] | None = None, keep_actors: bool = False, **options: Any):
        super().__init__(**options)
        self.keep_actors = keep_actors
        if actors is not None and (not isinstance(actors, int) or actors < 1):
            raise ValueError(f"actors must be a positive int or None (one per CPU or GPU), got {actors!r}")
        self.actors, self.address = actors, address
        self.num_cpus_per_actor, self.num_gpus_per_actor = num_cpus_per_actor, num_gpus_per_actor
        self.resources, self.device = resources, device
        self.init_options = dict(init_options or {})

    def open(self, source: ModelSource) -> Session:
        ray = _ray()
        if not ray.is_initialized():
            logger.info("starting Ray (address=%s)", self.address)
            ray.init(address=self.address, **self.init_options)
        return _RaySession(ray, self, source)

    def actor_count(self, ray) -> int:
        available = ray.cluster_resources()
        for name, need in (("CPU", self.num_cpus_per_actor), ("GPU", self.num_gpus_per_actor), *(self.resources or {}).items()):
            if need and available.get(name, 0) < need:
                raise ValueError(
                    f"each actor asks for {need} {name} but the Ray cluster has {available.get(name, 0)}; "
                    f"lower num_{name.lower()}s_per_actor / resources, or join a cluster that has them"
                )
        if self.actors is not None:
            return self.actors
        if self.num_gpus_per_actor:
            return max(1, int(available.get("GPU", 0) // self.num_gpus_per_actor))
        return max(1, int(available.get("CPU", 1) // max(self.num_cpus_per_actor, 1e-9)))


class _RaySession(Session):
    def __init__(self, ray, ex: RayExecutor, source: ModelSource):
        self.ray, self.ex = ray, ex
        self.workers = ex.actor_count(ray)
        options: dict[str, Any] = {"num_cpus": ex.num_cpus_per_actor, "num_gpus": ex.num_gpus_per_actor}
        if ex.resources:
            options["resources"] = ex.resources
        self._cls = ray.remote(**options)(_Worker)
        device = ex.device if ex.device is not None else ("cuda" if ex.num_gpus_per_actor else None)
        self._args = (source, device, max(1, int(ex.num_cpus_per_actor)))
        self._key = (ray.get_runtime_context().get_job_id(), source.identity(), repr(sorted(options.items())), repr(device))
        kept = _KEPT.pop(self._key, [])
        release_actors()  # actors kept for another model would hold the resources these need
        for extra in kept[self.workers :]:
            ray.kill(extra, no_restart=True)
        if kept:
            logger.info("reusing %d running actor(s) that hold this model", min(len(kept), self.workers))
        # New actors load the model in parallel.
        self.actors: list[Any] = kept[: self.workers] + [self._start() for _ in range(self.workers - len(kept))]

    def _start(self):
        return self._cls.remote(*self._args)

    def _replace(self, slot: int) -> None:
        try:
            self.ray.kill(self.actors[slot], no_restart=True)
        except Exception:  # already gone
            pass
        self.actors[slot] = self._start()

    def call(self, fn, *args):
        return self.ray.get(self.actors[0].call.remote(fn, *args))

    def map(self, fn, common, tasks, describe):
        ray = self.ray
        from ray.exceptions import RayActorError, RayTaskError

        common_ref = ray.put(common)
        queue, idle = deque(tasks), list(range(len(self.actors)))
        pending: dict[Any, tuple[int, Any]] = {}
        attempts: dict[int, int] = {}
        failed: list[tuple[Any, str]] = []
        while queue or pending:
            while idle and queue and not failed:
                slot, task = idle.pop(), queue.popleft()
                pending[self.actors[slot].call.remote(fn, common_ref, task)] = (slot, task)
            if not pending:
                break
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            slot, task = pending.pop(ref)
            try:
                output = ray.get(ref)
            except (RayActorError, RayTaskError) as exc:
                died = isinstance(exc, RayActorError)
                cause = exc.cause if isinstance(exc, RayTaskError) and exc.cause is not None else exc
                reason = f"{type(cause).__name__}: {_last_line(cause)}" + (" (the actor died)" if died else "")
                if died:
                    self._replace(slot)
                tries = attempts[id(task)] = attempts.get(id(task), 0) + 1
                logger.warning("%s failed on attempt %d of %d: %s", describe(task), tries, self.ex.max_retries + 1, reason)
                if tries > self.ex.max_retries:
                    failed.append((task, reason))
                else:
                    queue.appendleft(task)
                idle.append(slot)
                continue
            idle.append(slot)
            yield task, output
        if failed:
            task, reason = failed[0]
            more = f" ({len(failed) - 1} more shard(s) failed too)" if len(failed) > 1 else ""
            raise ShardError(
                f"{describe(task)} failed on all {self.ex.max_retries + 1} attempts: {reason}{more}", task, reason
            )

    def close(self) -> None:
        if self.ex.keep_actors:
            _KEPT[self._key] = self.actors
            self.actors = []
            return
        for actor in self.actors:
            try:
                self.ray.kill(actor, no_restart=True)
            except Exception:  # already gone
                pass
        self.actors = []


_KEPT: dict[tuple, list[Any]] = {}  # actors left running by keep_actors, by (Ray job, model, resources, device)


def release_actors() -> int:
    """Stop the actors that ``keep_actors=True`` left running; how many there were."""
    count = 0
    while _KEPT:
        _, actors = _KEPT.popitem()
        for actor in actors:
            count += 1
            try:
                _ray().kill(actor, no_restart=True)
            except Exception:  # already gone, or Ray was shut down
                pass
    return count


def _last_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[-1] if text else repr(exc)
