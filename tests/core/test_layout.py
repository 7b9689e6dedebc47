"""The package layout: old module paths still import, core loads no architecture library, and the
layer contract of pyproject.toml is checked for real (it fails on an upward import)."""

from __future__ import annotations

import importlib
import pkgutil
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import crosspatch
from crosspatch._moved import MOVED

REPO = Path(__file__).resolve().parents[2]
CORE_PACKAGES = sorted(p.parent.name for p in (REPO / "core").glob("*/__init__.py"))


@pytest.mark.parametrize("old", sorted(MOVED))
def test_an_old_path_is_the_module_that_holds_it_now(old):
    assert importlib.import_module(old) is importlib.import_module(MOVED[old])
    assert sys.modules[old] is sys.modules[MOVED[old]]


def test_old_submodule_paths_and_from_imports():
    from crosspatch.tasks.ioi import IOITask  # a submodule of a moved package
    from crosspatch.zoo.tasks.ioi import IOITask as again
    from crosspatch.reach import ModuleOutput, Reach  # the protocol now lives in the catalog
    from crosspatch.sites.catalog import Reach as protocol

    assert IOITask is again and Reach is protocol and ModuleOutput.__module__ == "crosspatch.engine.reach"
    # Packages that replaced a module of the same name give that module's names.
    from crosspatch.engine import Bound, Run, execute  # noqa: F401
    from crosspatch.plugins import get_registry  # noqa: F401
    from crosspatch.sites import Site, SiteError, Span  # noqa: F401
    from crosspatch.testing import AdapterConformance, assert_conforms, check_adapter  # noqa: F401
    from crosspatch.trainable import TrainableIntervention, load  # noqa: F401
    from crosspatch.zoo import ZooModel, get, models  # noqa: F401


def test_every_top_level_name_resolves():
    for name in crosspatch.__all__:
        assert getattr(crosspatch, name) is not None, name


def test_unknown_names_are_not_answered():
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("crosspatch.no_such_module")


def test_core_modules_import_no_architecture_library_at_module_level():
    """Every module of core, imported in a fresh interpreter, leaves transformers, diffusers,
    open_clip and ray unimported (the contract allows two imports inside functions)."""
    names = [
        m.name for package in CORE_PACKAGES
        for m in pkgutil.walk_packages(importlib.import_module(f"crosspatch.{package}").__path__, f"crosspatch.{package}.")
    ]
    assert len(names) > 60
    code = (
        "import importlib, sys\n"
        f"for name in {names!r}: importlib.import_module(name)\n"
        "print(sorted(m for m in ('transformers', 'diffusers', 'open_clip', 'ray') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def _lint(tmp_path: Path, edit: "tuple[str, str] | None") -> subprocess.CompletedProcess:
    """lint-imports on a copy of the installed package, with one line appended to one module."""
    lint = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    if not Path(lint).exists():
        pytest.skip("import-linter is not installed (pip install 'crosspatch[dev]')")
    site = tmp_path / "site"
    shutil.copytree(Path(crosspatch.__file__).parent, site / "crosspatch",
                    ignore=shutil.ignore_patterns("__pycache__"))
    if not (site / "crosspatch" / "adapters").is_dir():
        pytest.skip("crosspatch is installed in editable mode: its adapters live outside the package folder")
    if edit is not None:
        module, line = edit
        path = site / "crosspatch" / module
        path.write_text(path.read_text() + "\n" + line + "\n")
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(site)}
    return subprocess.run([lint, "--no-cache"], cwd=tmp_path, capture_output=True, text=True, env=env)


def test_layer_contract_holds_and_fails_on_an_upward_import(tmp_path):
    kept = _lint(tmp_path / "as_is", None)
    assert kept.returncode == 0, kept.stdout[-2000:]
    assert "0 broken" in kept.stdout
    broken = _lint(tmp_path / "upward", ("sites/site.py", "from crosspatch.methods import activation_patching"))
    assert broken.returncode != 0
    assert "crosspatch.sites.site -> crosspatch.methods" in broken.stdout


def test_a_module_imported_by_its_old_path_keeps_its_own_spec():
    """Its relative imports (also those inside functions) resolve in its own package, without an ImportWarning."""
    import warnings

    import crosspatch.model  # noqa: F401  (the old path of crosspatch.engine.model)
    module = sys.modules["crosspatch.engine.model"]
    assert module.__spec__.name == "crosspatch.engine.model" and module.__spec__.parent == module.__package__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        exec("from ..plugins import registry", vars(module).copy())
