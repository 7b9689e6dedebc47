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
``CROSSPATCH_PREFER``
    Comma-separated ``plugin:name`` pairs (``name`` may be ``*``): in a clash over ``name`` (an
    adapter, zoo model, task or intervention kind) the item of ``plugin`` wins, also over a
    built-in one, and its adapters are asked before the built-in ones.

Plugins added with :meth:`Registry.register` are not affected by the first two.

Names: the entry points of the ``crosspatch`` distribution itself are the built-in plugins. In a
clash of names a built-in item always wins over a plugin's, whatever the load order; between
plugins the first one loaded wins; ``CROSSPATCH_PREFER`` overrides both. The warning names the
plugin whose item was dropped.

Loading is all or nothing: an interrupted load (``KeyboardInterrupt`` while a plugin imports or
registers) leaves the registry unloaded, so the next use loads every plugin again.
``SystemExit`` from a plugin is a failure of that plugin, reported and skipped like an exception.

Importing this module is cheap: it imports neither torch nor any plugin.
"""

from __future__ import annotations

import contextlib
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
from typing import Any, Iterable, Iterator

import pluggy

from . import hookspecs

__all__ = [
    "BUILTIN_DISTRIBUTION",
    "DISABLE_ENV_VAR",
    "ENTRY_POINT_GROUP",
    "KINDS",
    "PLUGINS_ENV_VAR",
    "PREFER_ENV_VAR",
    "PluginInfo",
    "PluginLoadWarning",
    "Registry",
    "get_registry",
    "matches",
    "reset_registry",
]

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "crosspatch"
PLUGINS_ENV_VAR = "CROSSPATCH_PLUGINS"
DISABLE_ENV_VAR = "CROSSPATCH_DISABLE_PLUGINS"
PREFER_ENV_VAR = "CROSSPATCH_PREFER"
#: The distribution whose entry points are the built-in plugins.
BUILTIN_DISTRIBUTION = "crosspatch"

#: What a plugin may raise that is reported as its failure; any other BaseException
#: (KeyboardInterrupt) is the user stopping the load and propagates.
_PLUGIN_FAILURES = (Exception, SystemExit)


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
    #: An entry point of the ``crosspatch`` distribution itself: its names win every clash.
    builtin: bool = False

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
    if info.builtin:
        return f"crosspatch's built-in plugin {info.name!r}"
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


def _warn_interrupted(exc: BaseException, msg: str) -> None:
    """Report an interrupted load while ``exc`` propagates: as a warning (also when warnings are
    errors) and as a note on ``exc``, which the command line prints."""
    if hasattr(exc, "add_note"):
        exc.add_note(msg)
    with contextlib.suppress(Warning):
        _warn(msg)


def _env_names(var: str) -> set[str] | None:
    raw = os.environ.get(var)
    if raw is None:
        return None
    return {part.strip() for part in raw.split(",") if part.strip()}


def _preferences() -> set[tuple[str, str]]:
    """``CROSSPATCH_PREFER`` as ``(plugin, name)`` pairs; a malformed entry is warned about and ignored."""
    pairs = set()
    for part in sorted(_env_names(PREFER_ENV_VAR) or ()):
        plugin, colon, name = (x.strip() for x in part.partition(":"))
        if not (colon and plugin and name):
            _warn(
                f"{PREFER_ENV_VAR}: {part!r} is not of the form plugin:name (e.g. myplugin:transformers, "
                f"or myplugin:* for every name of the plugin); ignored"
            )
            continue
        pairs.add((plugin, name))
    return pairs


def _is_builtin(distribution: str | None) -> bool:
    return distribution is not None and distribution.replace("_", "-").lower() == BUILTIN_DISTRIBUTION


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
    a built-in plugin's item wins, else the first one's (``CROSSPATCH_PREFER``
    overrides both), and a :class:`PluginLoadWarning` names the plugin that lost.
    :meth:`adapters` lists preferred adapters first, then the built-in ones,
    then the others, each in plugin order: the order ``cp.wrap`` asks them in.

    Loading and collecting are all or nothing: a ``KeyboardInterrupt`` (or any
    other ``BaseException`` that is not ``SystemExit``) raised while a plugin
    imports or registers propagates, and the registry forgets the partial
    work, so the next call starts it again.

    Pass ``entry_points=False`` for a registry that only holds plugins added
    with :meth:`register` (useful in tests and embedded uses).
    """

    def __init__(self, *, entry_points: bool = True) -> None:
        self._use_entry_points = entry_points
        self._lock = threading.RLock()
        self._busy = False
        self._fresh()

    def _fresh(self) -> None:
        """The state before anything is loaded (also after an interrupted load)."""
        self._loaded = False
        self._pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self._pm.add_hookspecs(hookspecs)
        self._infos: dict[str, PluginInfo] = {}  # insertion order = plugin order
        self._load_errors: list[str] = []  # errors not tied to one plugin
        # kind -> item name -> (item, plugin name); only for collected kinds
        self._items: dict[str, dict[str, tuple[Any, str]]] = {}
        self._prefer: set[tuple[str, str]] = set()

    # -- public API ---------------------------------------------------------

    def plugins(self) -> list[PluginInfo]:
        """All plugins seen, including disabled and failed ones (copies)."""
        with self._lock:
            self._collect_all()
            return [info._copy() for info in self._infos.values()]

    def adapters(self) -> list[Any]:
        """Registered adapters: preferred ones, then built-in ones, then the others, each in plugin order."""
        with self._lock:
            self._collected("adapters")
            entries = list(self._items["adapters"].items())
            rank = {name: self._rank(plugin, name) for name, (_, plugin) in entries}
            return [item for name, (item, _) in sorted(entries, key=lambda e: -rank[e[0]])]

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

    def owner(self, kind: str, name: str) -> str | None:
        """The plugin whose ``kind`` item (``"adapters"``, ...) called ``name`` is kept, or None."""
        with self._lock:
            self._collected(kind)
            entry = self._items[kind].get(name)
            return None if entry is None else entry[1]

    def register(self, plugin: object, name: str | None = None) -> str:
        """Add a plugin (a module or object with hook implementations).

        A plugin added here is never built in: on a clash of names a built-in
        item wins, else the first one loaded (``CROSSPATCH_PREFER`` overrides).
        Unlike an entry point, a mistake here raises to the caller:
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
            with self._undo_on_interrupt(forget=name):
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
            self._prefer = _preferences()
            if self._use_entry_points:
                self._load_entry_points()
            self._loaded = True
        except BaseException:
            self._fresh()  # all or nothing: the next use loads every plugin again
            raise
        finally:
            self._busy = False

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
            info = PluginInfo(name=ep.name, distribution=dist, version=version, module=ep.module,
                              builtin=_is_builtin(dist))
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
            except _PLUGIN_FAILURES as exc:
                msg = f"{_describe(info)} failed to load: {_format_exc(exc)}; skipped"
                info.errors.append(msg)
                logger.debug(msg, exc_info=True)
                _warn(msg)
                continue
            except BaseException as exc:
                _warn_interrupted(
                    exc,
                    f"loading crosspatch plugins was interrupted ({_format_exc(exc)}) while importing "
                    f"{_describe(info)}; nothing was kept, the next use loads the plugins again"
                )
                raise
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
                with self._undo_on_interrupt():
                    self._items[kind] = {}
                    for info in list(self._infos.values()):
                        self._collect_from(kind, info)
            return {name: item for name, (item, _) in self._items[kind].items()}

    def _collect_all(self) -> None:
        for kind in KINDS:
            self._collected(kind)

    @contextlib.contextmanager
    def _undo_on_interrupt(self, forget: str | None = None) -> Iterator[None]:
        """Restore what is collected (and drop plugin ``forget``) when the block is interrupted."""
        items = {kind: dict(table) for kind, table in self._items.items()}
        infos = {name: info._copy() for name, info in self._infos.items()}
        try:
            yield
        except BaseException:
            self._items = items
            self._infos = infos
            if forget is not None and self._pm.has_plugin(forget):
                self._pm.unregister(name=forget)
            raise

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
        except _PLUGIN_FAILURES as exc:
            msg = (
                f"{_describe(info)} failed in {spec.hook}: {_format_exc(exc)}; "
                f"its {spec.kind} from this hook were skipped"
            )
            info.errors.append(msg)
            logger.debug(msg, exc_info=True)
            _warn(msg)
            return None
        except BaseException as exc:
            _warn_interrupted(
                exc,
                f"{_describe(info)} was interrupted in {spec.hook} ({_format_exc(exc)}); nothing it "
                f"registered was kept, the next use asks it again"
            )
            raise
        finally:
            open_ = False
        return pending

    def _rank(self, plugin: str, name: str) -> int:
        """2: the user prefers this plugin's ``name``; 1: a built-in plugin; 0: any other plugin."""
        if (plugin, name) in self._prefer or (plugin, "*") in self._prefer:
            return 2
        info = self._infos.get(plugin)
        return 1 if info is not None and info.builtin else 0

    def _merge(self, spec: _Kind, info: PluginInfo, items: Iterable[Any]) -> None:
        table = self._items[spec.kind]
        for item in items:
            key = getattr(item, spec.key_attr)
            if key not in table:
                table[key] = (item, info.name)
                info.registered.setdefault(spec.kind, []).append(key)
                continue
            owner = self._infos[table[key][1]]
            if owner is info:
                if table[key][0] is not item:
                    msg = f"{_describe(info)} registered {spec.noun} {key!r} twice; keeping the first"
                    info.errors.append(msg)
                    _warn(msg)
                continue
            new_rank, old_rank = self._rank(info.name, key), self._rank(owner.name, key)
            winner, loser = (info, owner) if new_rank > old_rank else (owner, info)
            if winner is info:  # the name changes hands, keeping its place in the table
                table[key] = (item, info.name)
                info.registered.setdefault(spec.kind, []).append(key)
                kept = owner.registered.get(spec.kind, [])
                if key in kept:
                    kept.remove(key)
                if not kept:
                    owner.registered.pop(spec.kind, None)
            if max(new_rank, old_rank) == 2:
                logger.info("%s %r: %s is used, as %s asks", spec.noun, key, _describe(winner), PREFER_ENV_VAR)
                if self._rank(loser.name, key) < 2:
                    continue
            why = "a built-in name stays built in" if self._rank(winner.name, key) == 1 else "the first one loaded wins"
            msg = (
                f"{_describe(loser)} registered {spec.noun} {key!r}, which {_describe(winner)} also registers; "
                f"{why}, so the {spec.noun} of {loser.name!r} is dropped "
                f"(to use it instead, set {PREFER_ENV_VAR}={loser.name}:{key})"
            )
            loser.errors.append(msg)
            _warn(msg)

    def _adapter_plugin(self, adapter: Any) -> PluginInfo | None:
        for item, plugin in self._items.get("adapters", {}).values():
            if item is adapter:
                return self._infos.get(plugin)
        return None


def matches(adapter: Any, model: Any, registry: "Registry | None" = None) -> bool:
    """``adapter.matches(model)``, False (with a :class:`PluginLoadWarning` naming the adapter and its
    plugin) when it raises: one broken plugin must not keep ``cp.wrap`` from serving any model.
    ``KeyboardInterrupt`` propagates."""
    try:
        return bool(adapter.matches(model))
    except _PLUGIN_FAILURES as exc:
        reg = registry if registry is not None else _registry
        info = None
        if reg is not None:
            with reg._lock:
                info = reg._adapter_plugin(adapter)
        where = f" of {_describe(info)}" if info is not None else ""
        cls = type(model)
        msg = (
            f"adapter {getattr(adapter, 'name', type(adapter).__name__)!r}{where} raised in matches() for "
            f"{cls.__module__}.{cls.__qualname__}: {_format_exc(exc)}; skipped"
        )
        logger.debug(msg, exc_info=True)
        _warn(msg)
        return False


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
