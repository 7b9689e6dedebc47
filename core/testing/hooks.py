"""Hook bookkeeping: a snapshot of every hook dict torch keeps (on each module and the global ones), and
putting them back while naming each hook a run left behind or removed.

Every engine run of the suite goes between :func:`snapshot_hooks` and :func:`restore_hooks`, so a leak
is reported once per kind of problem and never spoils the next check. The module naming used in those
messages (:func:`module_names`, :func:`where`) lives here too.
"""

from __future__ import annotations

from typing import Any

from torch import nn

# Every hook dict torch keeps on a module (and the global ones), by attribute name.
_MAIN_HOOKS = {
    "_forward_hooks": "forward hook",
    "_forward_pre_hooks": "forward pre-hook",
    "_backward_hooks": "backward hook",
    "_backward_pre_hooks": "backward pre-hook",
}
_GLOBAL = "<global>"

HookSnapshot = dict[str, tuple[Any, dict[str, dict]]]


def module_names(model: nn.Module) -> dict[int, str]:
    return {id(m): name for name, m in model.named_modules()}


def where(name: str) -> str:
    return f"module {name!r}" if name else "the root module"


def _global_hook_dicts() -> dict[str, dict]:
    import torch.nn.modules.module as tmod

    out = {}
    for attr in dir(tmod):
        value = getattr(tmod, attr)
        if attr.startswith("_global_") and "hooks" in attr and isinstance(value, dict):
            out[attr.removeprefix("_global")] = value
    return out


def _hook_dicts(module: nn.Module) -> dict[str, dict]:
    return {k: v for k, v in vars(module).items() if "hooks" in k and isinstance(v, dict)}


def snapshot_hooks(model: nn.Module) -> HookSnapshot:
    snap = {name: (m, {k: dict(v) for k, v in _hook_dicts(m).items()}) for name, m in model.named_modules()}
    snap[_GLOBAL] = (None, {k: dict(v) for k, v in _global_hook_dicts().items()})
    return snap


def restore_hooks(snap: HookSnapshot) -> list[str]:
    """Put every hook dict back as it was; return one line per difference found."""
    problems = []
    for name, (module, saved) in snap.items():
        current = _global_hook_dicts() if module is None else _hook_dicts(module)
        place = "the global module hooks" if module is None else where(name)
        for attr, before in saved.items():
            now = current.get(attr)
            if now is None or list(now) == list(before):
                continue
            noun = _MAIN_HOOKS.get(attr)
            added = [k for k in now if k not in before]
            removed = [k for k in before if k not in now]
            if noun is not None:
                if added:
                    problems.append(f"{len(added)} {noun}(s) left on {place}")
                if removed:
                    problems.append(f"{len(removed)} {noun}(s) it did not install removed from {place}")
            now.clear()
            now.update(before)
    return problems
