"""Every package folder under core/ and adapters/ is listed in pyproject.toml, so a regular install ships it."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _on_disk() -> set[str]:
    found = set()
    for folder, prefix in (("core", "crosspatch"), ("adapters", "crosspatch.adapters")):
        base = ROOT / folder
        for init in base.rglob("__init__.py"):
            parts = init.parent.relative_to(base).parts
            if "__pycache__" not in parts:
                found.add(".".join((prefix, *parts)))
    return found


def test_every_package_is_listed_for_install():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    assert _on_disk() - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"
    assert listed - _on_disk() == set(), "listed in pyproject.toml but not on disk"
