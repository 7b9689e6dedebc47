"""docs/plugins.md documents every hook spec, every conformance check and the plugin env vars."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from crosspatch.plugins import hookspecs
from crosspatch.plugins import registry as plugins
from crosspatch.testing import CHECKS

DOC = Path(__file__).resolve().parents[2] / "docs" / "plugins.md"


def hook_specs() -> dict[str, inspect.Signature]:
    marker = f"{hookspecs.PROJECT_NAME}_spec"
    return {
        name: inspect.signature(obj)
        for name, obj in vars(hookspecs).items()
        if callable(obj) and hasattr(obj, marker)
    }


def sections(text: str) -> dict[str, str]:
    """Heading line -> the text under it, up to the next heading of any level."""
    parts = re.split(r"^(#{1,6} .*)$", text, flags=re.M)
    return {parts[i].strip(): parts[i + 1] for i in range(1, len(parts) - 1, 2)}


def test_hookspecs_are_found():
    assert {"register_adapters", "register_models", "register_tasks", "register_interventions"} <= set(hook_specs())


@pytest.mark.parametrize("name", sorted(hook_specs()))
def test_every_hook_spec_has_a_section_naming_its_arguments(name):
    by_heading = sections(DOC.read_text())
    matching = [body for heading, body in by_heading.items() if re.search(rf"\b{name}\b", heading)]
    assert matching, f"docs/plugins.md has no heading for hook spec {name!r}; add '### `{name}`'"
    body = matching[0]
    for arg in hook_specs()[name].parameters:
        assert f"`{arg}`" in body or f"{arg}(" in body, f"the section on {name} does not mention its argument {arg!r}"


@pytest.mark.parametrize("check", list(CHECKS))
def test_every_conformance_check_is_documented(check):
    assert f"| `{check}` |" in DOC.read_text(), f"docs/plugins.md: add a row for check {check!r}"


def test_env_vars_and_entry_point_group_are_documented():
    text = DOC.read_text()
    needles = (
        plugins.PLUGINS_ENV_VAR, plugins.DISABLE_ENV_VAR, f"[project.entry-points.{plugins.ENTRY_POINT_GROUP}]",
        "crosspatch install", "crosspatch uninstall", "ModuleOutput(root, path", "ModuleInput(root, path",
    )
    for needle in needles:
        assert needle in text, needle
