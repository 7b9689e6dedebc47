"""The model zoo: small models built from configs, trained here on the project's tasks, and cached.

    from crosspatch import zoo
    loaded = zoo.load("ioi-gpt2-tiny")        # trains on first use (under a minute on one CPU core), then reloads
    loaded.model, loaded.tokenizer, loaded.info["accuracy"]

No weights come from a hub. Plugins register :class:`ZooModel` specs through the ``register_models``
hook; a spec knows how to *build* a model into an empty folder (train it and write every file) and
how to *load* it back. This module knows no architecture library: it only manages the cache.

Cache layout: ``<cache_dir()>/zoo/<name>/v<version>-seed<seed>[-steps<steps>]/``. A build runs in a
temporary sibling folder, writes ``manifest.json`` last (name, version, seed, steps, metrics, the
sha256 and size of every file, crosspatch version) and is then renamed into place, so a folder
either is complete or is not used. A folder with no valid manifest, or with a file whose size or
hash differs from it, is partial or corrupted: it is logged as a warning and rebuilt. If two
processes build the same model at once, the first rename wins and the other uses its result.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

__all__ = [
    "CACHE_ENV_VAR", "Loaded", "TrainSettings", "ZooError", "ZooModel", "cache_dir", "cached", "did_you_mean",
    "get", "load", "model_dir", "models", "train",
]

logger = logging.getLogger(__name__)

CACHE_ENV_VAR = "CROSSPATCH_CACHE"
MANIFEST = "manifest.json"
_MANIFEST_FORMAT = 1


class ZooError(LookupError):
    """An unknown zoo model, or one that cannot be built or loaded."""


@dataclass
class TrainSettings:
    """What a build is asked for: the seed, the number of steps (``None``: the model's default) and
    whether to show a progress bar (``None``: ``CROSSPATCH_PROGRESS`` decides)."""

    seed: int = 0
    steps: int | None = None
    progress: bool | None = None


@dataclass
class Loaded:
    """A loaded zoo model: the model (in eval mode), its tokenizer (or ``None``) and facts about it
    (name, path, seed, version and the metrics its build recorded, such as held-out accuracy)."""

    model: Any
    tokenizer: Any
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ZooModel:
    """A zoo entry, as registered by a plugin.

    ``build(folder, settings)`` trains and writes every file into the empty ``folder`` and returns
    JSON-able metrics (accuracy, train_seconds, steps...). ``load(folder)`` loads what build wrote;
    it gets ``None`` for packaged pretrained models (``trains=False``, no build). Bump ``version``
    when training changes: caches of older versions are not reused.
    """

    name: str
    description: str
    adapter: str
    task: str | None
    build: Callable[[Path, TrainSettings], dict] | None
    load: Callable[[Path | None], Loaded]
    version: str = "1"
    trains: bool = True

    def __post_init__(self) -> None:
        if self.trains and self.build is None:
            raise ValueError(f"zoo model {self.name!r} trains but has no build function")


def cache_dir() -> Path:
    """``$CROSSPATCH_CACHE``, else ``$XDG_CACHE_HOME/crosspatch``, else ``~/.cache/crosspatch``."""
    env = os.environ.get(CACHE_ENV_VAR)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "crosspatch"
    return Path.home() / ".cache" / "crosspatch"


def models() -> dict[str, ZooModel]:
    """Every registered zoo model by name (from the plugin registry)."""
    from ..plugins.registry import get_registry

    return get_registry().models()


def get(name: str) -> ZooModel:
    """The zoo model called ``name``; :class:`ZooError` names it and lists the others if unknown."""
    registered = models()
    if name not in registered:
        known = ", ".join(sorted(registered)) or "none registered"
        raise ZooError(
            f"no zoo model named {name!r}{did_you_mean(name, registered)}; the zoo has: {known} "
            f"(plugins add models with the register_models hook; `crosspatch zoo list` shows them)"
        )
    return registered[name]


def did_you_mean(name: str, known: Any) -> str:
    """``" (did you mean 'ioi-gpt2-tiny'?)"`` for a close match among ``known`` names, else ``""``."""
    import difflib

    close = difflib.get_close_matches(str(name), [str(k) for k in known], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def model_dir(name: str, seed: int = 0, steps: int | None = None) -> Path:
    """Where the build of ``name`` with this seed and step count lives (whether or not it exists)."""
    spec = get(name)
    return _folder(spec, seed, steps)


def cached(name: str, seed: int = 0, steps: int | None = None) -> bool:
    """Whether a complete, intact build of ``name`` is in the cache (packaged models: always)."""
    spec = get(name)
    if not spec.trains:
        return True
    return _check(_folder(spec, seed, steps), spec, seed, steps) is None


def load(
    name: str,
    *,
    device: Any = None,
    dtype: Any = None,
    seed: int = 0,
    steps: int | None = None,
    progress: bool | None = None,
    rebuild: bool = False,
) -> Loaded:
    """Load zoo model ``name``, training it first if its cache is missing, partial or corrupted.

    ``seed`` and ``steps`` pick the build (each combination is cached on its own); ``rebuild``
    trains again even if a good build exists. ``device`` and ``dtype`` move the model after loading
    (default: CPU and the dtype it was saved in).
    """
    spec = get(name)
    if not spec.trains:
        loaded = spec.load(None)
        loaded.info = {"name": name, "path": None, **dict(loaded.info)}
        return _finish(loaded, device, dtype)
    settings = TrainSettings(seed=seed, steps=steps, progress=progress)
    folder = _folder(spec, seed, steps)
    manifest = None
    if not rebuild:
        problem = _check(folder, spec, seed, steps)
        if problem is None:
            manifest = _read_manifest(folder)
        elif problem != "missing":
            logger.warning("zoo model %r: cache folder %s is %s; rebuilding it", name, folder, problem)
    if manifest is None:
        manifest = _build(spec, folder, settings, replace=rebuild)
    try:
        loaded = spec.load(folder)
    except Exception as exc:
        if rebuild:
            raise
        logger.warning(
            "zoo model %r: loading %s failed (%s: %s); rebuilding it", name, folder, type(exc).__name__, exc
        )
        manifest = _build(spec, folder, settings, replace=True)
        loaded = spec.load(folder)
    loaded.info = _info(spec, folder, manifest, loaded.info)
    return _finish(loaded, device, dtype)


def train(name: str, *, seed: int = 0, steps: int | None = None, progress: bool | None = None) -> Loaded:
    """Train ``name`` now, replacing any cached build with the same seed and steps, and load it."""
    spec = get(name)
    if not spec.trains:
        raise ZooError(f"zoo model {name!r} is pretrained (shipped as a package); there is nothing to train")
    return load(name, seed=seed, steps=steps, progress=progress, rebuild=True)


# ------------------------------------------------------------------ internals


def _folder(spec: ZooModel, seed: int, steps: int | None) -> Path:
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {seed!r}")
    if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or steps < 1):
        raise ValueError(f"steps must be a positive int or None, got {steps!r}")
    leaf = f"v{spec.version}-seed{seed}" + (f"-steps{steps}" if steps is not None else "")
    return cache_dir() / "zoo" / spec.name / leaf


def _info(spec: ZooModel, folder: Path, manifest: dict, extra: dict) -> dict[str, Any]:
    info: dict[str, Any] = {
        "name": spec.name, "path": str(folder), "version": spec.version,
        "seed": manifest.get("seed"), "steps_requested": manifest.get("steps"),
    }
    info.update(manifest.get("metrics") or {})
    info.update(extra or {})
    info["manifest"] = manifest
    return info


def _finish(loaded: Loaded, device: Any, dtype: Any) -> Loaded:
    if device is not None or dtype is not None:
        loaded.model = loaded.model.to(device=device, dtype=dtype)
    return loaded


def _hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _files(folder: Path) -> dict[str, dict[str, Any]]:
    out = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != MANIFEST:
            out[path.relative_to(folder).as_posix()] = {"size": path.stat().st_size, "sha256": _hash(path)}
    return out


def _read_manifest(folder: Path) -> dict[str, Any]:
    with open(folder / MANIFEST, encoding="utf-8") as f:
        return json.load(f)


def _check(folder: Path, spec: ZooModel, seed: int, steps: int | None) -> str | None:
    """``None`` if ``folder`` holds a complete intact build, else what is wrong with it."""
    if not folder.exists():
        return "missing"
    if not folder.is_dir():
        return "not a folder"
    try:
        manifest = _read_manifest(folder)
    except FileNotFoundError:
        return f"partial (no {MANIFEST})"
    except (OSError, ValueError) as exc:
        return f"corrupted ({MANIFEST} unreadable: {type(exc).__name__})"
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        return f"corrupted ({MANIFEST} has no file list)"
    expected = {"name": spec.name, "version": spec.version, "seed": seed, "steps": steps}
    for key, value in expected.items():
        if manifest.get(key) != value:
            return f"mismatched ({MANIFEST} says {key}={manifest.get(key)!r}, expected {value!r})"
    if not manifest["files"]:
        return f"corrupted ({MANIFEST} lists no files)"
    for rel, meta in manifest["files"].items():
        path = folder / rel
        try:
            size = path.stat().st_size
        except OSError:
            return f"partial ({rel} is missing)"
        if not isinstance(meta, dict) or size != meta.get("size"):
            return f"corrupted ({rel} has {size} bytes, the manifest says {meta.get('size') if isinstance(meta, dict) else '?'})"
        try:
            if _hash(path) != meta.get("sha256"):
                return f"corrupted ({rel} does not match its sha256)"
        except OSError as exc:
            return f"corrupted ({rel} unreadable: {type(exc).__name__})"
    return None


def _crosspatch_version() -> str:
    try:
        from importlib.metadata import version

        return version("crosspatch")
    except Exception:  # pragma: no cover - running from a source tree that is not installed
        return "0+unknown"


def _build(spec: ZooModel, folder: Path, settings: TrainSettings, *, replace: bool) -> dict[str, Any]:
    """Build into a temporary sibling, write the manifest last, rename into place; the manifest."""
    parent = folder.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.build-", dir=parent))
    logger.info("zoo model %r: training into %s (seed %d, steps %s)", spec.name, folder, settings.seed,
                settings.steps if settings.steps is not None else "default")
    try:
        start = time.perf_counter()
        metrics = spec.build(tmp, settings)
        seconds = time.perf_counter() - start
        if metrics is None:
            metrics = {}
        if not isinstance(metrics, dict):
            raise ZooError(f"zoo model {spec.name!r}: build returned {type(metrics).__name__}, expected a dict")
        files = _files(tmp)
        if not files:
            raise ZooError(f"zoo model {spec.name!r}: build wrote no files into {tmp}")
        manifest = {
            "format": _MANIFEST_FORMAT,
            "name": spec.name,
            "version": spec.version,
            "seed": settings.seed,
            "steps": settings.steps,
            "metrics": metrics,
            "build_seconds": round(seconds, 3),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "crosspatch": _crosspatch_version(),
            "files": files,
        }
        text = json.dumps(manifest, indent=2, sort_keys=True, default=str)
        with open(tmp / MANIFEST, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        _install(tmp, folder, spec, settings, replace)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return _read_manifest(folder)  # ours, or the one another process installed first


def _install(tmp: Path, folder: Path, spec: ZooModel, settings: TrainSettings, replace: bool) -> None:
    """Move the finished build ``tmp`` to ``folder``.

    A good build that appeared meanwhile (another process) is kept unless ``replace``; anything
    else at ``folder`` is moved aside and deleted first.
    """
    for _ in range(5):
        try:
            os.rename(tmp, folder)
            return
        except OSError:
            if not folder.exists():
                raise
        if not replace and _check(folder, spec, settings.seed, settings.steps) is None:
            logger.info("zoo model %r: another process finished %s first; using it", spec.name, folder)
            return
        trash = folder.with_name(f".{folder.name}.old-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(folder, trash)
        except FileNotFoundError:
            continue  # someone else moved it; try again
        if trash.is_dir():
            shutil.rmtree(trash, ignore_errors=True)
        else:
            trash.unlink(missing_ok=True)
    raise ZooError(f"zoo model {spec.name!r}: could not move the new build into {folder}")
