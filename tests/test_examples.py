"""Every example answers --help with its usage and exits, without doing any work; the ones that train a
zoo model on first use say how long that takes before they start."""

from __future__ import annotations

import re
import runpy
import sys
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.py"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_help_prints_usage_and_exits(path, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CROSSPATCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(sys, "argv", [str(path), "--help"])
    try:
        with pytest.raises(SystemExit) as info:
            runpy.run_path(str(path), run_name="__main__")
    except ModuleNotFoundError as exc:  # an optional library the example needs (open_clip, diffusers)
        pytest.skip(f"{path.name} needs {exc.name}")
    assert info.value.code in (0, None)
    assert capsys.readouterr().out.startswith("usage: ")
    assert list(tmp_path.iterdir()) == []  # no report, no plot, no zoo build


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_that_train_say_how_long_first(path):
    source = path.read_text()
    if not re.search(r"zoo\.(load|cached)\(|cp\.wrap\(MODEL", source) or '"minilm"' in source:
        return  # no zoo model to train (minilm is pretrained)
    notes = re.findall(r"print\(f?\"training .*?\"\)", source, re.S)
    assert notes and all(re.search(r"minute", note) for note in notes), (path.name, notes)
