"""``crosspatch plugins``: the plugins found through the ``crosspatch`` entry-point group, what each
registered (adapters, models, tasks, interventions) and any load errors, as a table or as JSON.
Load problems are part of this command's output, so they are not repeated as warnings."""

from __future__ import annotations

import argparse
import json
import warnings
from typing import Any, Sequence

from ..plugins import registry as _plugins
from .tables import format_rows

__all__ = ["add_plugins"]


def add_plugins(sub: Any) -> None:
    p = sub.add_parser(
        "plugins",
        help="list installed plugins and what they registered",
        description=(
            "List the plugins found through the 'crosspatch' entry-point group, what each "
            "registered (adapters, models, tasks, interventions) and any load errors. "
            "Filter with CROSSPATCH_PLUGINS (allow-list) and CROSSPATCH_DISABLE_PLUGINS. Built-in names win "
            "every clash with a plugin's; CROSSPATCH_PREFER=plugin:name makes a plugin's win instead."
        ),
    )
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    p.set_defaults(func=_cmd_plugins)


def _cmd_plugins(args: argparse.Namespace) -> int:
    registry = _plugins.get_registry()
    with warnings.catch_warnings():
        # Load problems are part of this command's output; don't repeat them as warnings.
        warnings.simplefilter("ignore", _plugins.PluginLoadWarning)
        infos = registry.plugins()
        errors = registry.errors()
    if args.json:
        print(json.dumps([info.to_dict() for info in infos], indent=2))
        return 0
    print(_plugins_table(infos, errors))
    return 0


def _registered_summary(info: _plugins.PluginInfo) -> str:
    parts = [
        f"{kind}: {', '.join(info.registered[kind])}"
        for kind in _plugins.KINDS
        if info.registered.get(kind)
    ]
    return "; ".join(parts) or "-"


def _plugins_table(infos: Sequence[_plugins.PluginInfo], errors: Sequence[str]) -> str:
    lines: list[str] = []
    if not infos:
        lines.append("No crosspatch plugins found.")
    else:
        rows = [("PLUGIN", "DISTRIBUTION", "STATUS", "REGISTERED")]
        for info in infos:
            dist = " ".join(x for x in (info.distribution, info.version) if x) or "(in code)"
            rows.append((info.name, dist, info.status, _registered_summary(info)))
        lines.extend(format_rows(rows))
    if errors:
        lines.append("")
        lines.append(f"Load errors ({len(errors)}):")
        lines.extend(f"  - {e}" for e in errors)
    return "\n".join(lines)
