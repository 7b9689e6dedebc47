"""Finished shards on disk, so a run that fails part-way resumes instead of starting over.

Layout: ``<root>/<study key>/<shard tag>.json`` plus ``about.json`` (what the key was made from,
for a human reading the folder). The key is a hash of everything that decides a shard's numbers
(method, options, prepared inputs, concrete sites, metric, model), so a different study never
picks up another one's shards. Each file is written to a temporary name and renamed into place: a
file either is complete or is not there. The study's folder is removed once its Result is merged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..results.metrics import Metric
from .sharding import Shard, ShardOutput, Study

__all__ = ["ShardStore", "study_key", "default_root", "tensor_bytes"]

logger = logging.getLogger(__name__)


def default_root() -> Path:
    """``<crosspatch cache dir>/shards`` (``$CROSSPATCH_CACHE`` moves it)."""
    from ..zoo.store import cache_dir

    return cache_dir() / "shards"


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """dtype, shape and raw bytes of a tensor: what a content hash needs."""
    flat = tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
    return f"{tensor.dtype}{tuple(tensor.shape)}".encode() + flat


def _metric_bytes(metric: Any) -> bytes:
    """The metric's identity: its pickle; for closures and lambdas cloudpickle's (by value), else the
    code and the values it closes over."""
    try:
        return pickle.dumps(metric)
    except Exception:
        pass
    for name in ("cloudpickle", "ray.cloudpickle"):
        try:
            import importlib

            return importlib.import_module(name).dumps(metric)
        except Exception:
            continue
    return _structure(metric).encode()


def _structure(obj: Any, depth: int = 0) -> str:
    """Code and closed-over values of a callable, as text (the fallback when nothing can pickle it)."""
    if depth > 4:
        return repr(obj)
    target = obj.fn if isinstance(obj, Metric) else obj
    code = getattr(target, "__code__", None)
    if code is None:
        return f"{type(obj).__qualname__}:{getattr(obj, 'name', '')}:{repr(getattr(obj, '__dict__', obj))}"
    cells = [_structure(c.cell_contents, depth + 1) for c in (target.__closure__ or ())]
    return f"{getattr(obj, 'name', '')}:{code.co_code.hex()}:{code.co_consts!r}:{cells}"


def study_key(study: Study, model_identity: str) -> str:
    """A hash of what decides the study's numbers; equal arguments give equal keys."""
    digest = hashlib.sha256()

    def add(label: str, data: bytes) -> None:
        digest.update(label.encode() + b"\0" + hashlib.sha256(data).digest())

    add("method", study.method.encode())
    add("model", model_identity.encode())
    add("normalize", str(study.normalize).encode())
    add("options", json.dumps(study.options, sort_keys=True, default=repr).encode())
    add("sites", "\n".join(map(str, study.sites)).encode())
    for side, inputs in (("clean", study.clean), ("corrupt", study.corrupt)):
        for name in sorted(inputs):
            value = inputs[name]
            if isinstance(value, torch.Tensor):
                add(f"{side}.{name}", tensor_bytes(value))
            else:
                add(f"{side}.{name}", repr(value).encode())
    add("metric", _metric_bytes(study.metric))
    return digest.hexdigest()[:24]


class ShardStore:
    """The saved shards of one study."""

    def __init__(self, root: "str | Path", key: str):
        self.folder = Path(root).expanduser() / key

    def load(self, shards: list[Shard]) -> dict[int, ShardOutput]:
        """The outputs already saved for ``shards`` (by shard tag), keyed by shard index."""
        done: dict[int, ShardOutput] = {}
        for shard in shards:
            path = self.folder / f"{shard.tag}.json"
            if not path.exists():
                continue
            try:
                done[shard.index] = ShardOutput.from_json(json.loads(path.read_text(encoding="utf-8")))
            except (OSError, ValueError, TypeError) as exc:
                logger.warning("ignoring unreadable saved shard %s (%s: %s); it runs again", path, type(exc).__name__, exc)
        return done

    def save(self, shard: Shard, output: ShardOutput, about: dict[str, Any] | None = None) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        if about is not None and not (self.folder / "about.json").exists():
            self._write(self.folder / "about.json", about)
        path = self.folder / f"{shard.tag}.json"
        self._write(path, output.to_json())
        return path

    def saved(self) -> list[Path]:
        return sorted(p for p in self.folder.glob("*.json") if p.name != "about.json") if self.folder.exists() else []

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    @staticmethod
    def _write(path: Path, data: dict[str, Any]) -> None:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f, default=str)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
