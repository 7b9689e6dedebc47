"""Finished shards on disk, so a run that fails part-way resumes instead of starting over.

Layout: ``<root>/<study key>/<shard tag>.json`` plus ``about.json`` (the key format, method, model,
sites and shard count, for a human reading the folder and for recognising a study's leftovers). The
key hashes a canonical description of everything that decides a shard's numbers
(:mod:`crosspatch.scale.identity`: method, options, prepared inputs, concrete sites, metric, model,
library versions), so the same study finds its shards from any process, and a different study never
picks up another one's. Each file is written to a temporary name and renamed into place: a file
either is complete or is not there. The study's folder is removed once its Result is merged, with
the folders earlier runs of the same study left under a key format that could not resume.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from .identity import describe, tensor_bytes
from .sharding import Shard, ShardOutput, Study

__all__ = ["ShardStore", "study_key", "study_about", "default_root", "tensor_bytes", "KEY_FORMAT"]

logger = logging.getLogger(__name__)

#: The study-key format. Folders without it in ``about.json`` were keyed by pickled bytes (format 1),
#: which changed on every round trip, so they never resume; a completed study removes its own.
KEY_FORMAT = 2


def default_root() -> Path:
    """``<crosspatch cache dir>/shards`` (``$CROSSPATCH_CACHE`` moves it)."""
    from ..zoo.store import cache_dir

    return cache_dir() / "shards"


def _versions() -> dict[str, str]:
    """What computes the numbers besides the study: crosspatch, torch, Python (bytecode differs by version)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        mine = version("crosspatch")
    except PackageNotFoundError:  # running from a source tree
        mine = "source"
    return {"crosspatch": mine, "torch": torch.__version__, "python": platform.python_version()}


def study_key(study: Study, model_identity: str) -> str:
    """A hash of a canonical description of what decides the study's numbers: equal in any process for
    equal arguments (a metric holding tensors too), different when any of them differs. Raises
    :class:`~crosspatch.scale.identity.Opaque` when part of the study cannot be described."""
    inputs = {"clean": study.clean, "corrupt": study.corrupt}
    description = {
        "format": KEY_FORMAT,
        "method": study.method,
        "model": model_identity,
        "normalize": study.normalize,
        "options": describe(study.options, "the method's options"),
        "sites": [str(s) for s in study.sites],
        "inputs": describe(inputs, "the inputs"),
        "metric": describe(study.metric, "metric"),
        "versions": _versions(),
    }
    text = json.dumps(description, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def study_about(study: Study, method: str, model_identity: str, shards: int) -> dict[str, Any]:
    """What ``about.json`` records: enough to tell a person, and a later run, which study a folder holds."""
    return {"key_format": KEY_FORMAT, "method": method, "model": model_identity, "sites": study.sites_label,
            "shards": shards}


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

    def leftovers(self, about: dict[str, Any], model_identities: "tuple[str, ...]" = ()) -> list[Path]:
        """Folders beside this one that earlier runs of the same study left under an older key format:
        same method, sites and model (its identity now, or as the older format named it), no
        ``key_format``. Such a folder can never resume (its key changed on every run), so it is safe
        to remove; a folder of the current format is another study's and is kept."""
        root = self.folder.parent
        if not root.is_dir():
            return []
        models = {about["model"], *model_identities}
        sites = json.loads(json.dumps(about["sites"], default=str))
        found = []
        for folder in sorted(p for p in root.iterdir() if p.is_dir() and p != self.folder):
            try:
                old = json.loads((folder / "about.json").read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if (isinstance(old, dict) and "key_format" not in old and old.get("method") == about["method"]
                    and old.get("sites") == sites and old.get("model") in models):
                found.append(folder)
        return found

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
