"""Tests for the ``crosspatch`` command line (``crosspatch plugins`` and globals)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import install_fake_dist
from crosspatch.cli import app as cli
from crosspatch.plugins import registry as plugins
from crosspatch.plugins.registry import reset_registry

VENV_BIN = Path(sys.executable).parent
CROSSPATCH_EXE = VENV_BIN / "crosspatch"

GOOD = '''
from crosspatch.hookspecs import hookimpl

class DummyAdapter:
    name = "dummy"

class DummyIntervention:
    kind = "dummy_iv"

@hookimpl
def register_adapters(register):
    register(DummyAdapter())

@hookimpl
def register_interventions(register):
    register(DummyIntervention)
'''

BROKEN = 'raise ImportError("boom from cpclifake_broken")\n'

MODULES = {"cpclifake_good": GOOD, "cpclifake_broken": BROKEN}
ENTRY_POINTS = {"fpc_good": "cpclifake_good", "fpc_broken": "cpclifake_broken"}


def _forget() -> None:
    for mod in MODULES:
        sys.modules.pop(mod, None)


@pytest.fixture
def fakeplug(tmp_path, monkeypatch):
    install_fake_dist(tmp_path, MODULES, ENTRY_POINTS)
    monkeypatch.syspath_prepend(str(tmp_path))
    # Only the fake plugins: keeps built-in entry points out of these tests.
    monkeypatch.setenv(plugins.PLUGINS_ENV_VAR, ",".join(ENTRY_POINTS))
    monkeypatch.delenv(plugins.DISABLE_ENV_VAR, raising=False)
    _forget()
    reset_registry()
    yield tmp_path
    _forget()
    reset_registry()


def test_plugins_table(fakeplug, capsys):
    assert cli.main(["plugins"]) == 0
    out, err = capsys.readouterr()
    assert err == ""  # load problems are in the output, not repeated as warnings
    good_line = next(line for line in out.splitlines() if line.startswith("fpc_good"))
    assert "fakeplug 0.1" in good_line and "ok" in good_line
    assert "adapters: dummy" in good_line and "interventions: dummy_iv" in good_line
    broken_line = next(line for line in out.splitlines() if line.startswith("fpc_broken"))
    assert "failed" in broken_line
    errors = out.split("Load errors (1):", 1)[1]
    assert "fpc_broken" in errors and "ImportError: boom from cpclifake_broken" in errors


def test_plugins_table_shows_disabled(fakeplug, capsys, monkeypatch):
    monkeypatch.setenv(plugins.DISABLE_ENV_VAR, "fpc_broken")
    assert cli.main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "disabled" in next(line for line in out.splitlines() if line.startswith("fpc_broken"))
    assert "Load errors" not in out


def test_plugins_json(fakeplug, capsys):
    assert cli.main(["plugins", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    by_name = {d["name"]: d for d in data}
    assert {n for n, d in by_name.items() if not d["disabled"]} == set(ENTRY_POINTS)
    good = by_name["fpc_good"]
    assert good["distribution"] == "fakeplug" and good["version"] == "0.1"
    assert good["module"] == "cpclifake_good"
    assert good["registered"] == {"adapters": ["dummy"], "interventions": ["dummy_iv"]}
    assert good["errors"] == [] and good["disabled"] is False
    assert "ImportError" in by_name["fpc_broken"]["errors"][0]


def test_no_plugins(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(plugins.PLUGINS_ENV_VAR, "")
    reset_registry()
    try:
        assert cli.main(["plugins"]) == 0
    finally:
        reset_registry()
    out = capsys.readouterr().out
    assert "Load errors" not in out


def test_help_and_version(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "usage: crosspatch" in out and "plugins" in out
    assert cli.main(["plugins", "--help"]) == 0
    assert "--json" in capsys.readouterr().out
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("crosspatch ")
    assert cli.main([]) == 0  # no command: help
    assert "usage: crosspatch" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["nope"], ["--bogus"], ["plugins", "extra"]])
def test_usage_errors_are_one_line_exit_2(argv, capsys):
    assert cli.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("crosspatch: error: ") and err.count("\n") == 1


def test_unexpected_errors_are_one_line_exit_2(monkeypatch, capsys):
    def explode():
        raise RuntimeError("registry on fire\nsecond line")

    monkeypatch.setattr(plugins, "get_registry", explode)
    assert cli.main(["plugins"]) == 2
    err = capsys.readouterr().err
    assert err == "crosspatch: error: RuntimeError: registry on fire second line\n"


def _subprocess_env(extra_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CROSSPATCH_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(extra_path), env.get("PYTHONPATH")]))
    # Keep the test independent of built-in plugins (and of importing torch).
    env[plugins.DISABLE_ENV_VAR] = "transformers"
    return env


def test_console_script_survives_broken_plugin(tmp_path):
    install_fake_dist(tmp_path, MODULES, ENTRY_POINTS)
    exe = CROSSPATCH_EXE if CROSSPATCH_EXE.exists() else Path("/work/main/.venv/bin/crosspatch")
    proc = subprocess.run(
        [str(exe), "plugins"], capture_output=True, text=True, env=_subprocess_env(tmp_path), timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "fpc_good" in proc.stdout and "adapters: dummy" in proc.stdout
    assert "boom from cpclifake_broken" in proc.stdout
    assert "Traceback" not in proc.stderr


def test_python_dash_m(tmp_path):
    install_fake_dist(tmp_path, MODULES, ENTRY_POINTS)
    proc = subprocess.run(
        [sys.executable, "-m", "crosspatch", "plugins", "--json"],
        capture_output=True, text=True, env=_subprocess_env(tmp_path), timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    names = {d["name"] for d in json.loads(proc.stdout)}
    assert {"fpc_good", "fpc_broken"} <= names
