"""The README's Python code runs as written: the first example, and "Your first study" block by block
in one session, as a reader pasting them would."""

import dataclasses
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks(section: str | None = None) -> list[str]:
    """The ```python blocks of the README, or of one ``## section`` of it."""
    text = README.read_text()
    if section is not None:
        start = text.index(f"## {section}\n")
        end = text.find("\n## ", start + 1)
        text = text[start : end if end != -1 else None]
    return re.findall(r"```python\n(.*?)```", text, re.S)


def test_readme_example_runs(tmp_path, monkeypatch):
    code = _blocks()[0]
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert (tmp_path / "heads.png").stat().st_size > 1000
    assert (tmp_path / "heads.json").exists()
    assert namespace["res"].dims == ("layer", "head")


@pytest.fixture
def quick_ioi_model(tmp_path, monkeypatch):
    """ioi-gpt2-tiny as the zoo caches it, built with fewer steps (the README needs it to run, not to be
    good at IOI), in a temporary cache."""
    pytest.importorskip("transformers")
    from crosspatch.adapters.transformers.zoo import IOI_RECIPE, build_ioi
    from crosspatch.zoo import store as zoo

    monkeypatch.setenv(zoo.CACHE_ENV_VAR, str(tmp_path / "cache"))
    spec = zoo.get("ioi-gpt2-tiny")
    recipe = dataclasses.replace(IOI_RECIPE, steps=150, eval_prompts=50)
    quick = dataclasses.replace(spec, build=lambda folder, settings: build_ioi(folder, settings, recipe))
    zoo._build(quick, zoo.model_dir(spec.name), zoo.TrainSettings(progress=False), replace=False)
    assert zoo.cached(spec.name)


def test_your_first_study_runs_step_by_step(tmp_path, monkeypatch, quick_ioi_model, capsys):
    blocks = _blocks("Your first study")
    assert len(blocks) == 5
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for i, code in enumerate(blocks, 1):
        exec(compile(code, f"README.md (Your first study, step {i})", "exec"), namespace)
    resid, heads = namespace["resid"], namespace["heads"]
    first = namespace["pairs"][0].clean.split()
    assert resid.dims == ("layer", "pos") and resid.coords["pos"][:2] == [f"0 {first[0]}", f"1 {first[1]}"]
    assert resid.skipped is not None and resid.skipped.any()
    assert heads.dims == ("layer", "head")
    for name in ("resid_pre.png", "heads.png", "resid_pre.json", "heads.json"):
        assert (tmp_path / name).stat().st_size > 500, name
    out = capsys.readouterr().out
    assert "'When', 'Mary', 'and', 'John'" in out and "logit difference" in out


def test_the_family_table_lists_every_family_a_catalog_shows():
    """Every family the transformers adapter (GPT-2, Llama, BERT) and the generic adapter can show."""
    pytest.importorskip("transformers")
    import sys

    import torch

    import crosspatch as cp

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from conftest import tiny_bert, tiny_gpt2, tiny_llama

    text = README.read_text()
    table = text[text.index("| family | axes | what |"):text.index("Any model no adapter serves")]
    listed = set(re.findall(r"`([a-z_]+)(?:\.<path>)?`", table))
    families = set()
    for model in (tiny_gpt2(), tiny_llama(), tiny_bert(), tiny_bert("cls")):
        families |= set(cp.wrap(model).catalog.families)
    generic = cp.wrap(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU()).eval(), adapter="generic")
    families |= {name.split(".")[0] for name in generic.catalog.families}
    missing = sorted(f for f in families if f not in listed)
    assert not missing, f"README's family table lacks {missing}"
