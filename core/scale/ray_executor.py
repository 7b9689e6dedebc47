"""The Ray executor: shards run on Ray actors that each load the model once.

    from crosspatch.ray_executor import RayExecutor
    ex = RayExecutor(address="auto", actors=8, num_gpus_per_actor=1)
    res = cp.activation_patching("ioi-gpt2-tiny", clean, corrupt, "head_out.*[head=*]", metric, executor=ex)

Ray is imported only when a run starts (``pip install "crosspatch[ray]"``). With no running Ray
connection the executor connects to ``address`` (or ``$RAY_ADDRESS``) when one is given, and
otherwise starts a local cluster that stays on this machine: every Ray service and worker listens on
127.0.0.1 only, and no dashboard runs. It leaves Ray up for the next study and stops the actors it
started when the study ends. An actor that dies is replaced (it loads the model again) and its shard
retried; see :mod:`crosspatch.executors` for retries, errors and resume.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
from collections import deque
from typing import Any, Iterator

from .executors import Executor, Session, ShardError
from .model_source import ModelSource

__all__ = ["RayExecutor", "release_actors", "LOOPBACK"]

logger = logging.getLogger(__name__)

#: The address a local cluster started for the user binds every service to.
LOOPBACK = "127.0.0.1"


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
    initialised yet (``"auto"``, ``"host:6379"`` or ``"ray://host:10001"``); ``None`` uses
    ``$RAY_ADDRESS`` when set, else starts a local cluster bound to 127.0.0.1 (:meth:`connect`).
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
        return _RaySession(self.connect(), self, source)

    def connect(self):
        """Ray, initialised, as the ``ray`` module. A connection already made (``ray.init`` by the user) is
        used as it is. Else an address the user gave (``address=``, or Ray's ``$RAY_ADDRESS``) is joined;
        with none, a local cluster is started that stays on this machine: its node is 127.0.0.1, so every
        Ray service and worker listens on loopback only, and no dashboard runs (``init_options`` may
        override both; a local cluster on another address is refused)."""
        ray = _ray()
        if ray.is_initialized():
            return ray
        options = dict(self.init_options)
        address = options.pop("address", None) if self.address is None else self.address
        if address is None:
            address = os.environ.get("RAY_ADDRESS") or None
        if address is not None and address != "local":
            logger.info("connecting to the Ray cluster at %s", address)
            ray.init(address=address, **options)
            return ray
        options.setdefault("include_dashboard", False)
        node_ip = options.setdefault("_node_ip_address", LOOPBACK)
        logger.info("starting a local Ray cluster on %s", node_ip)
        with _loopback_allowed(ray):
            ray.init(address="local", **options)
        if _is_loopback(node_ip):
            _check_loopback(ray)
        return ray

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


def _is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address or name (``127.0.0.1``, ``::1``, ``localhost``)."""
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


@contextlib.contextmanager
def _loopback_allowed(ray) -> Iterator[None]:
    """Let ``ray.init`` keep a loopback node address. On Linux Ray replaces ``127.0.0.1`` by the
    machine's outward address (so that other nodes could reach it); with its switch for single-machine
    clusters (the one ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` sets at import) off, it keeps loopback.
    Restored afterwards; a Ray without the switch is left alone (:func:`_check_loopback` then decides)."""
    ray_constants = getattr(getattr(ray, "_private", None), "ray_constants", None)
    before = getattr(ray_constants, "ENABLE_RAY_CLUSTER", None)  # a Ray that moved it: the check after init holds
    if before is None:
        yield
        return
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before


def _check_loopback(ray) -> None:
    """The started cluster's node must be on loopback: a cluster registered on an outward address would
    listen there too. Shut it down and say so otherwise."""
    addresses = sorted({str(node.get("NodeManagerAddress")) for node in ray.nodes()})
    outward = [a for a in addresses if not _is_loopback(a)]
    if outward:
        ray.shutdown()
        raise RuntimeError(
            f"the local Ray cluster registered its node at {', '.join(outward)}, not {LOOPBACK}, so its services "
            f"would listen on that address; this Ray version ignores the loopback node address. Start Ray "
            f"yourself (ray.init(...)) or pass address= for a cluster you have secured (docs/scaling.md)"
        )


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
