"""``crosspatch extract``: MIPS on a zoo TaskRNN writes the report folder; other models go to decompilation."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
import torch

from crosspatch.cli.app import main
from crosspatch.plugins.registry import get_registry, reset_registry
from mips_nets import parity_rnn

FAKE_RNN = "rnn-test-parity"


def _build(folder: Path, settings) -> dict:
    net = parity_rnn()
    torch.save({"shape": net.shape.to_dict(), "state": net.state_dict()}, folder / "rnn.pt")
    return {"accuracy": 1.0, "steps": 0, "train_seconds": 0.0, "note": "hand-set parity machine"}


LOADS: list[Path | None] = []  # every load of the fake zoo entry's folder


def _load(folder: Path | None):
    from crosspatch.zoo.algorithmic.rnn import RNNShape, TaskRNN
    from crosspatch.zoo.store import Loaded

    LOADS.append(folder)
    saved = torch.load(folder / "rnn.pt")
    net = TaskRNN(RNNShape.from_dict(saved["shape"]))
    net.load_state_dict(saved["state"])
    return Loaded(net.eval(), None, {"name": FAKE_RNN})


class _RNNZooPlugin:
    """Registers the hand-set parity network as a zoo entry of task ``parity-all``."""

    from crosspatch.plugins.hookspecs import hookimpl

    @hookimpl
    def register_models(self, register):
        from crosspatch.zoo.store import ZooModel

        register(ZooModel(FAKE_RNN, "hand-set parity RNN for tests", "none", "parity-all", _build, _load))


@pytest.fixture
def rnn_zoo(tmp_path, monkeypatch):
    monkeypatch.setenv("CROSSPATCH_CACHE", str(tmp_path / "cache"))
    reset_registry()
    get_registry().register(_RNNZooPlugin(), "fake-rnn-zoo")
    yield tmp_path
    reset_registry()


def test_extract_writes_the_report_folder(rnn_zoo, capsys):
    out = rnn_zoo / "report"
    LOADS.clear()
    code = main(["extract", FAKE_RNN, "--out", str(out), "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert len(LOADS) == 1  # the network is loaded once: telling it is an RNN and extracting share the load
    assert "solved" in printed and "not solved" not in printed
    assert {p.name for p in out.iterdir()} == {"program.py", "verification.json", "lattice.png"}
    report = json.loads((out / "verification.json").read_text())
    assert report["task"] == "parity-all" and report["solved"] is True and report["model"] == FAKE_RNN
    assert report["verification"]["network_mode"] == "exhaustive" and report["verification"]["network_mismatches"] == 0
    namespace: dict = {}
    exec((out / "program.py").read_text(), namespace)  # standalone: runs with nothing imported
    assert namespace["program"]([1, 1, 0, 1]) == [1, 0, 0, 1]


def test_extract_against_a_wrong_task_fails_with_exit_1(rnn_zoo, capsys):
    """Against the ground truth of another task the program still matches the network, not the truth."""
    code = main(["extract", FAKE_RNN, "--task", "parity-zeros", "--out", str(rnn_zoo / "r"), "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 1 and "not solved" in printed and "ground truth" in printed


def test_extract_other_models_go_to_decompilation(monkeypatch, tmp_path, capsys):
    calls = []

    def fake_decompile(source, task, out, *, progress=None):
        calls.append((source, task, Path(out), progress))
        return types.SimpleNamespace(decompiles=True, files={"program": str(Path(out) / "program.py")})

    import crosspatch.methods.decompile as decompile

    monkeypatch.setattr(decompile, "extract_program", fake_decompile)
    code = main(["extract", "not-a-zoo-model", "--task", "hist", "--out", str(tmp_path / "d"), "--no-progress"])
    assert code == 0 and calls == [("not-a-zoo-model", "hist", tmp_path / "d", False)]
    assert "decompiles" in capsys.readouterr().out
