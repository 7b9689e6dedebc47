"""``crosspatch install`` / ``uninstall``: the pip command line they run and the exit codes they return.

pip is never run for real here: the subprocess call is replaced by a recorder.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import install_fake_dist
from crosspatch.cli import app as cli
from crosspatch.cli import install as cli_install
from crosspatch.plugins import registry as plugins
from crosspatch.plugins.registry import reset_registry

PIP = [sys.executable, "-m", "pip"]
LIST = [sys.executable, "-m", "crosspatch", "plugins"]


@pytest.fixture(autouse=True)
def wired(monkeypatch):
    """The two commands in the CLI, whether or not crosspatch.cli lists them yet."""
    commands = list(cli._SUBCOMMANDS)
    for add in (cli_install.add_install, cli_install.add_uninstall):
        if not any(getattr(a, "__name__", None) == add.__name__ for a in commands):
            commands.append(add)
    monkeypatch.setattr(cli, "_SUBCOMMANDS", commands)


class Recorder:
    def __init__(self, codes=()):
        self.calls: list[list[str]] = []
        self.codes = list(codes)

    def __call__(self, argv, *args, **kwargs):
        assert not args and not kwargs, "output must stream: no capture, no pipes"
        self.calls.append(list(argv))
        return self.codes.pop(0) if self.codes else 0


@pytest.fixture
def calls(monkeypatch):
    rec = Recorder()
    monkeypatch.setattr(subprocess, "call", rec)
    return rec


def test_install_runs_pip_of_this_python_then_lists_plugins(calls, capsys):
    assert cli.main(["install", "crosspatch-torchvision"]) == 0
    assert calls.calls == [PIP + ["install", "crosspatch-torchvision"], LIST]
    out, err = capsys.readouterr()
    assert "running" in err and "-m pip install crosspatch-torchvision" in err
    assert "crosspatch plugins now:" in out


def test_install_options(calls):
    argv = ["install", "-U", "--pre", "--force-reinstall", "--no-cache-dir", "-e", "./a", "-e", "./b", "x>=1", "y"]
    assert cli.main(argv) == 0
    assert calls.calls[0] == PIP + [
        "install", "--upgrade", "--force-reinstall", "--no-cache-dir", "--pre", "-e", "./a", "-e", "./b", "x>=1", "y",
    ]


def test_install_editable_only(calls):
    assert cli.main(["install", "-e", "plugins/crosspatch-template"]) == 0
    assert calls.calls[0] == PIP + ["install", "-e", "plugins/crosspatch-template"]


@pytest.mark.parametrize("code", [1, 2, 23])
def test_pip_failure_propagates_its_exit_code_and_skips_the_listing(monkeypatch, capsys, code):
    rec = Recorder([code])
    monkeypatch.setattr(subprocess, "call", rec)
    assert cli.main(["install", "no-such-plugin"]) == code
    assert rec.calls == [PIP + ["install", "no-such-plugin"]]
    assert f"pip exited with code {code}" in capsys.readouterr().err


def test_a_failed_listing_does_not_fail_the_install(monkeypatch, capsys):
    rec = Recorder([0, 1])
    monkeypatch.setattr(subprocess, "call", rec)
    assert cli.main(["install", "p"]) == 0
    assert "listing the plugins failed" in capsys.readouterr().err


def test_install_needs_something_to_install(calls, capsys):
    assert cli.main(["install"]) == 2
    assert calls.calls == []
    assert capsys.readouterr().err.startswith("crosspatch: error: name at least one package")


def test_uninstall(calls):
    assert cli.main(["uninstall", "some-dist", "other"]) == 0
    assert calls.calls == [PIP + ["uninstall", "-y", "some-dist", "other"], LIST]


def test_uninstall_propagates_pip_exit_code(monkeypatch):
    rec = Recorder([1])
    monkeypatch.setattr(subprocess, "call", rec)
    assert cli.main(["uninstall", "not-installed"]) == 1
    assert len(rec.calls) == 1


@pytest.mark.parametrize("name", ["crosspatch", "CrossPatch", "crosspatch>=0.1"])
def test_uninstall_refuses_crosspatch_itself(calls, capsys, name):
    assert cli.main(["uninstall", name]) == 2
    assert calls.calls == [] and "refusing to uninstall crosspatch" in capsys.readouterr().err


def test_uninstall_refuses_a_builtin_plugin(calls, capsys):
    assert cli.main(["uninstall", "transformers"]) == 2  # the built-in plugin, not the library
    assert calls.calls == []
    assert "CROSSPATCH_DISABLE_PLUGINS=transformers" in capsys.readouterr().err


MODULES = {
    "cpinstfake_good": "from crosspatch.hookspecs import hookimpl\n",
    "cpinstfake_broken": "raise ImportError('boom')\n",
}


@pytest.fixture
def fakeplug(tmp_path, monkeypatch):
    install_fake_dist(tmp_path, MODULES, {"fpi_good": "cpinstfake_good", "fpi_broken": "cpinstfake_broken"})
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv(plugins.PLUGINS_ENV_VAR, raising=False)
    monkeypatch.delenv(plugins.DISABLE_ENV_VAR, raising=False)
    for mod in MODULES:
        sys.modules.pop(mod, None)
    reset_registry()
    yield tmp_path
    for mod in MODULES:
        sys.modules.pop(mod, None)
    reset_registry()


def test_uninstall_by_plugin_name_removes_its_distribution(fakeplug, calls, capsys):
    assert cli.main(["uninstall", "fpi_broken"]) == 0
    assert calls.calls[0] == PIP + ["uninstall", "-y", "fakeplug"]
    assert "comes from distribution 'fakeplug'" in capsys.readouterr().err
    assert "cpinstfake_broken" not in sys.modules  # plugins are looked up, never imported


def test_install_help_with_a_broken_plugin_present(fakeplug, calls, capsys):
    assert cli.main(["install", "--help"]) == 0
    out = capsys.readouterr().out
    assert "usage: crosspatch install" in out and "--editable" in out
    assert cli.main(["uninstall", "--help"]) == 0
    assert "usage: crosspatch uninstall" in capsys.readouterr().out
    assert calls.calls == [] and "cpinstfake_broken" not in sys.modules


def test_install_with_a_broken_plugin_present(fakeplug, calls, capsys):
    assert cli.main(["install", "something"]) == 0  # the listing runs in a subprocess, which survives it too
    assert cli.main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "fpi_good" in out and "boom" in out


def test_top_level_help_lists_the_commands(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "install" in out and "uninstall" in out


def test_cli_install_imports_only_the_standard_library():
    """Cheap to import (the CLI imports it for --help): stdlib at the top, crosspatch.cli lazily."""
    import ast

    tree = ast.parse(Path(cli_install.__file__).read_text())
    top = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            top |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            top.add("." if node.level else node.module.split(".")[0])
    assert top <= set(sys.stdlib_module_names) | {"__future__"}, top
