"""The plugin template installs like a user's plugin would, and crosspatch then finds its adapter."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TEMPLATE = Path(__file__).resolve().parents[2] / "plugins" / "crosspatch-template"


def _env(site: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CROSSPATCH_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    return env


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The template built into a wheel and installed into a throw-away target directory."""
    root = tmp_path_factory.mktemp("template")
    source = root / "src"
    # Build from a copy: setuptools writes build/ and *.egg-info next to the sources.
    ignore = shutil.ignore_patterns("build", "*.egg-info", "__pycache__", ".pytest_cache")
    shutil.copytree(TEMPLATE, source, ignore=ignore)
    site = root / "site"
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
           "--disable-pip-version-check", "--target", str(site), str(source)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        # The venv's own build backend is missing or too old (no setuptools, or one that needs
        # `wheel`): let pip fetch setuptools from PyPI into an isolated build environment.
        first = proc
        cmd.remove("--no-build-isolation")
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, (
            f"pip install failed without build isolation:\n{first.stderr}\nand with it:\n{proc.stdout}\n{proc.stderr}"
        )
    assert (site / "crosspatch_template" / "plugin.py").exists()
    return site


@pytest.fixture(scope="module")
def listed(installed) -> tuple[list[dict], list[str]]:
    """One fresh interpreter with the target on PYTHONPATH: `crosspatch plugins --json`, then wrap()."""
    code = (
        "import sys\n"
        "from crosspatch.cli import main\n"
        "code = main(['plugins', '--json'])\n"
        "import crosspatch as cp\n"
        "from crosspatch_template import MLPClassifier\n"
        "m = cp.wrap(MLPClassifier().eval())\n"
        "print('WRAPPED', m.adapter.name, type(m.adapter).__module__, ','.join(m.sites().families))\n"
        "sys.exit(code)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=_env(installed), timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    listing, _, wrapped = proc.stdout.rpartition("WRAPPED")
    return json.loads(listing), wrapped.split()


def test_crosspatch_plugins_lists_the_template(listed):
    by_name = {d["name"]: d for d in listed[0]}
    info = by_name["template"]
    assert info["distribution"] == "crosspatch-template" and info["version"] == "0.1.0"
    assert info["module"] == "crosspatch_template.plugin"
    assert info["registered"] == {"adapters": ["mlp"]}
    assert info["errors"] == [] and info["loaded"] and not info["disabled"]


def test_wrap_picks_the_template_adapter(listed):
    assert listed[1] == ["mlp", "crosspatch_template.adapter", "hidden_in,hidden,logits"]
