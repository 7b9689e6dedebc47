"""Plugin discovery and the registry of adapters, models, tasks and interventions.

Plugins are found through the ``crosspatch`` entry-point group and loaded
lazily, the first time the registry is asked for something.  A plugin that
fails to import, or whose hook raises, is skipped with a
:class:`PluginLoadWarning`; it never takes the other plugins (or the caller)
down with it.

Environment variables (read when the registry loads):

``CROSSPATCH_PLUGINS``
    Comma-separated allow-list of entry-point names.  When set, only these are
    loaded; set but empty means none at all.
``CROSSPATCH_DISABLE_PLUGINS``
    Comma-separated entry-point names to skip.  Applied after the allow-list.

Plugins added with :meth:`Registry.register` are not affected by either.

Importing this module is cheap: it imports neither torch nor any plugin.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import logging
import os
import sys
import threading
import types
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable

import pluggy

from . import hookspecs

__all__ = [
    "DISABLE_ENV_VAR",
    "ENTRY_POINT_GROUP",
    "KINDS",
    "PLUGINS_ENV_VAR",
    "PluginInfo",
    "PluginLoadWarning",
    "Registry",
    "get_registry",
    "reset_registry",
]

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "crosspatch"
PLUGINS_ENV_VAR = "CROSSPATCH_PLUGINS"
DISABLE_ENV_VAR = "CROSSPATCH_DISABLE_PLUGINS"


@dataclass(frozen=True)
class _Kind:
    kind: str  # key in PluginInfo.registered, e.g. "adapters"
    hook: str  # hook name, e.g. "register_adapters"
    key_attr: str  # attribute holding the item's unique name
    noun: str  # singular, for messages
    needs_class: bool = False


_KINDS: dict[str, _Kind] = {
    k.kind: k
    for k in (
        _Kind("adapters", "register_adapters", "name", "adapter"),
        _Kind("models", "register_models", "name", "model"),
        _Kind("tasks", "register_tasks", "name", "task"),
        _Kind("interventions", "register_interventions", "kind", "intervention", needs_class=True),
    )
}

#: The kinds of things plugins register, in display order.
KINDS: tuple[str, ...] = tuple(_KINDS)


class PluginLoadWarning(UserWarning):
    """A plugin failed to load or to register something and was skipped."""


@dataclass
class PluginInfo:
    """What the registry knows about one plugin."""

    #: Entry-point name (or the name given to :meth:`Registry.register`).
    name: str
    #: Distribution that declares the entry point; ``None`` if registered in code.
    distribution: str | None = None
    version: str | None = None
    #: Module the plugin lives in (the entry point's module part).
    module: str | None = None
    #: Kind (``"adapters"``, ``"models"``, ``"tasks"``, ``"interventions"``)
    #: -> names this plugin registered and the registry kept.  Kinds with
    #: nothing registered are left out.
    registered: dict[str, list[str]] = field(default_factory=dict)
    #: One line per problem (failed import, hook that raised, duplicate name...).
    errors: list[str] = field(default_factory=list)
    #: Skipped because of CROSSPATCH_PLUGINS / CROSSPATCH_DISABLE_PLUGINS.
    disabled: bool = False
    #: Whether the plugin object was imported and added to the plugin manager.
    loaded: bool = False

    @property
    def status(self) -> str:
        """``"disabled"``, ``"failed"`` (did not load), ``"errors"`` or ``"ok"``."""
        if self.disabled:
            return "disabled"
        if not self.loaded:
            return "failed"
        return "errors" if self.errors else "ok"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def _copy(self) -> PluginInfo:
        return dataclasses.replace(
            self,
            registered={k: list(v) for k, v in self.registered.items()},
            errors=list(self.errors),
        )


def _format_exc(exc: BaseException) -> str:
    msg = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


def _describe(info: PluginInfo) -> str:
    if info.distribution:
        version = f" {info.version}" if info.version else ""
        return f"plugin {info.name!r} ({info.distribution}{version})"
    return f"plugin {info.name!r}"


def _warn(msg: str) -> None:
    """Warn with the location of the first caller outside this module."""
    level = 2  # stacklevel 2 is _warn's caller, i.e. sys._getframe(1)
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename == __file__:
        level += 1
        frame = frame.f_back
    warnings.warn(msg, PluginLoadWarning, stacklevel=level)


def _env_names(var: str) -> set[str] | None:
    raw = os.environ.get(var)
    if raw is None:
        return None
    return {part.strip() for part in raw.split(",") if part.strip()}


def _entry_points() -> list[importlib.metadata.EntryPoint]:
    """The entry points of the crosspatch group, without exact duplicates."""
    seen: set[tuple[str, str]] = set()
    out = []
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        key = (ep.name, ep.value)
        if key in seen:
            continue
        seen.add(key)
        out.append(ep)
    return out


def _dist_of(ep: importlib.metadata.EntryPoint) -> tuple[str | None, str | None]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return None, None
    try:
        return dist.metadata["Name"], dist.version
    except Exception:  # broken metadata must not break discovery
        return None, None


class Registry:
    """Plugins and what they registered.

    Entry points are loaded on first use (any method call).  Each kind of item
    is collected from the plugins the first time it is asked for, and cached.

    Order: entry points in discovery order, then plugins added with
    :meth:`register` in call order.  When two plugins register the same name,
    the first one wins and a :class:`PluginLoadWarning` names both.

    Pass ``entry_points=False`` for a registry that only holds plugins added
    with :meth:`register` (useful in tests and embedded uses).
    """

    def __init__(self, *, entry_points: bool = True) -> None:
        self._use_entry_points = entry_points
        self._lock = threading.RLock()
        self._loaded = False
        self._busy = False
        self._pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self._pm.add_hookspecs(hookspecs)
        self._infos: dict[str, PluginInfo] = {}  # insertion order = plugin order
        self._load_errors: list[str] = []  # errors not tied to one plugin
        # kind -> item name -> (item, plugin name); only for collected kinds
        self._items: dict[str, dict[str, tuple[Any, str]]] = {}

    # -- public API ---------------------------------------------------------

    def plugins(self) -> list[PluginInfo]:
        """All plugins seen, including disabled and failed ones (copies)."""
        with self._lock:
            self._collect_all()
            return [info._copy() for info in self._infos.values()]

    def adapters(self) -> list[Any]:
        """Registered adapters, in plugin order."""
        return list(self._collected("adapters").values())

    def models(self) -> dict[str, Any]:
        """Zoo model specs by name."""
        return self._collected("models")

    def tasks(self) -> dict[str, Any]:
        """Counterfactual task specs by name."""
        return self._collected("tasks")

    def interventions(self) -> dict[str, type]:
        """Intervention classes by serialisation name (``cls.kind``)."""
        return self._collected("interventions")

    def errors(self) -> list[str]:
        """Every problem met while loading plugins and collecting from them."""
        with self._lock:
            self._collect_all()
            out = list(self._load_errors)
            for info in self._infos.values():
                out.extend(info.errors)
            return out

    def register(self, plugin: object, name: str | None = None) -> str:
        """Add a plugin (a module or object with hook implementations).

        Entry points are loaded first, so they keep precedence on duplicate
        names.  Unlike an entry point, a mistake here raises to the caller:
        :class:`ValueError` if the name or object is already registered,
        :class:`pluggy.PluginValidationError` if a hook implementation does
        not match its specification.  Errors raised by the plugin's hooks are
        still warned about and skipped.  Returns the plugin's name.
        """
        with self._lock:
            self._ensure_loaded()
            if name is None:
                name = self._pm.get_canonical_name(plugin)
            if name in self._infos:
                raise ValueError(f"a crosspatch plugin named {name!r} is already registered")
            self._pm.register(plugin, name)
            if isinstance(plugin, types.ModuleType):
                module = plugin.__name__
            elif isinstance(plugin, type):
                module = plugin.__module__
            else:
                module = type(plugin).__module__
            info = PluginInfo(name=name, module=module, loaded=True)
            self._infos[name] = info
            logger.debug("registered crosspatch plugin %r in code", name)
            self._check_unknown_hooks(info, plugin)
            for kind in list(self._items):  # kinds already collected
                self._collect_from(kind, info)
            return name

    @property
    def plugin_manager(self) -> pluggy.PluginManager:
        """The underlying pluggy manager (after loading entry points)."""
        with self._lock:
            self._ensure_loaded()
            return self._pm

    # -- loading ------------------------------------------------------------

    def _ensure_loaded(self) -> None:
        if self._loaded:
            return
        if self._busy:
            raise RuntimeError("the crosspatch plugin registry was used while it was loading plugins")
        self._busy = True
        try:
            if self._use_entry_points:
                self._load_entry_points()
        finally:
            self._busy = False
            self._loaded = True

    def _load_entry_points(self) -> None:
        allow = _env_names(PLUGINS_ENV_VAR)
        deny = _env_names(DISABLE_ENV_VAR) or set()
        try:
            eps = _entry_points()
        except Exception as exc:  # corrupt metadata somewhere on sys.path
            msg = f"could not list crosspatch entry points: {_format_exc(exc)}; no plugins loaded"
            self._load_errors.append(msg)
            logger.debug(msg, exc_info=True)
            _warn(msg)
            return
        for ep in eps:
            dist, version = _dist_of(ep)
            info = PluginInfo(name=ep.name, distribution=dist, version=version, module=ep.module)
            if ep.name in self._infos:
                other = self._infos[ep.name]
                msg = (
                    f"{_describe(info)}: entry point name {ep.name!r} is already used by "
                    f"{_describe(other)} ({other.module}); skipped"
                )
                self._load_errors.append(msg)
                _warn(msg)
                continue
            self._infos[ep.name] = info
            if (allow is not None and ep.name not in allow) or ep.name in deny:
                info.disabled = True
                logger.debug("crosspatch plugin %r disabled by environment", ep.name)
                continue
            try:
                obj = ep.load()
                self._pm.register(obj, ep.name)
            except Exception as exc:
                msg = f"{_describe(info)} failed to load: {_format_exc(exc)}; skipped"
                info.errors.append(msg)
                logger.debug(msg, exc_info=True)
                _warn(msg)
                continue
            info.loaded = True
            logger.debug("loaded crosspatch plugin %r from %s", ep.name, ep.value)
            self._check_unknown_hooks(info, obj)

    def _check_unknown_hooks(self, info: PluginInfo, plugin: object) -> None:
        """Warn about hook implementations no spec knows (usually a typo)."""
        for caller in self._pm.get_hookcallers(plugin) or ():
            if caller.has_spec():
                continue
            msg = f"{_describe(info)} implements unknown hook {caller.name!r}; it will never be called"
            info.errors.append(msg)
            _warn(msg)

    # -- collecting ---------------------------------------------------------

    def _collected(self, kind: str) -> dict[str, Any]:
        with self._lock:
            self._ensure_loaded()
            if kind not in self._items:
                self._items[kind] = {}
                for info in self._infos.values():
                    self._collect_from(kind, info)
            return {name: item for name, (item, _) in self._items[kind].items()}

    def _collect_all(self) -> None:
        for kind in KINDS:
            self._collected(kind)

    def _collect_from(self, kind: str, info: PluginInfo) -> None:
        """Call ``info``'s implementations of the ``kind`` hook, one call at a time."""
        if not info.loaded:
            return
        spec = _KINDS[kind]
        caller = getattr(self._pm.hook, spec.hook)
        impls = [i for i in caller.get_hookimpls() if i.plugin_name == info.name]
        for impl in impls:
            if impl.hookwrapper or impl.wrapper:
                logger.debug("ignoring wrapper %s of plugin %r", spec.hook, info.name)
                continue
            items = self._call_impl(impl, spec, info)
            if items is not None:
                self._merge(spec, info, items)

    def _call_impl(self, impl: Any, spec: _Kind, info: PluginInfo) -> list[Any] | None:
        pending: list[Any] = []
        open_ = True

        def register(item: Any) -> None:
            if not open_:
                raise RuntimeError(f"{spec.hook}'s register() called after the hook returned")
            _validate(spec, item)
            pending.append(item)

        available: dict[str, Any] = {"register": register}
        kwargs = {arg: available[arg] for arg in impl.argnames}
        try:
            impl.function(**kwargs)
        except Exception as exc:
            msg = (
                f"{_describe(info)} failed in {spec.hook}: {_format_exc(exc)}; "
                f"its {spec.kind} from this hook were skipped"
            )
            info.errors.append(msg)
            logger.debug(msg, exc_info=True)
            _warn(msg)
            return None
        finally:
            open_ = False
        return pending

    def _merge(self, spec: _Kind, info: PluginInfo, items: Iterable[Any]) -> None:
        table = self._items[spec.kind]
        for item in items:
            key = getattr(item, spec.key_attr)
            if key in table:
                owner = self._infos[table[key][1]]
                if owner is info and table[key][0] is item:
                    continue  # same object registered twice by one plugin
                msg = (
                    f"{_describe(info)} registered {spec.noun} {key!r}, already registered by "
                    f"{_describe(owner)}; keeping the one from {owner.name!r}"
                )
                info.errors.append(msg)
                _warn(msg)
                continue
            table[key] = (item, info.name)
            info.registered.setdefault(spec.kind, []).append(key)


def _validate(spec: _Kind, item: Any) -> None:
    if spec.needs_class and not isinstance(item, type):
        raise TypeError(f"{spec.noun} must be a class, got {type(item).__name__} instance")
    key = getattr(item, spec.key_attr, None)
    if not isinstance(key, str) or not key:
        raise TypeError(
            f"{spec.noun} {item!r} needs a non-empty str .{spec.key_attr} attribute, got {key!r}"
        )


_registry: Registry | None = None
_registry_lock = threading.Lock()


def get_registry() -> Registry:
    """The process-wide registry (created on first call; loads plugins lazily)."""
    global _registry
    reg = _registry
    if reg is None:
        with _registry_lock:
            if _registry is None:
                _registry = Registry()
            reg = _registry
    return reg


def reset_registry() -> None:
    """Forget the process-wide registry so the next use rediscovers plugins.

    Call after installing or uninstalling a plugin distribution, or between
    tests.  Also invalidates import-system caches so new distributions are seen.
    """
    global _registry
    with _registry_lock:
        _registry = None
    importlib.invalidate_caches()
