"""The RNN search on two easy tasks (a few seconds each): it reaches 100 % on held-out lengths up to 12,
checked here against the task's Python truth on fresh sequences; the L1 stage keeps that; the zoo entry
builds, saves and reloads the same network."""

from __future__ import annotations

import json

import pytest
import torch

from crosspatch import zoo
from crosspatch.zoo.algorithmic import TaskRNN, get_algorithmic_task
from crosspatch.zoo.algorithmic.checkpoint import load_task_rnn, save_task_rnn
from crosspatch.zoo.algorithmic.search import SearchConfig, heldout_check, search_rnn, simplify_l1, train_rnn

FAST = SearchConfig(steps=800, max_linear_hidden=2, max_hidden=4, test_sequences=512, l1_steps=200, max_runs=6)


def _truth_accuracy(model: TaskRNN, task, length: int, seed: int) -> float:
    """Share of fresh sequences (a seed the search never saw) on which the network equals the Python truth."""
    x, _ = task.sample(256, length, seed=seed, split="test")
    with torch.no_grad():
        pred = model.predict(x).tolist()
    return sum(p == task.truth(row) for p, row in zip(pred, x)) / len(pred)


@pytest.fixture(scope="module")
def sum_last2():
    torch.set_num_threads(1)
    return search_rnn(get_algorithmic_task("sum-last2"), seed=0, config=FAST, progress=False)


def test_search_solves_and_generalises(sum_last2):
    r, task = sum_last2, get_algorithmic_task("sum-last2")
    assert r.success and r.task == "sum-last2"
    assert sorted(r.accuracy_by_length) == list(range(1, 13)) and set(r.accuracy_by_length.values()) == {1.0}
    # sum of the last two needs two numbers of memory: no linear network of hidden size 1 can hold them
    assert r.shape.f_hidden == () and r.shape.g_hidden == () and r.shape.hidden_dim == 2
    one = [a for a in r.attempts if a.shape.hidden_dim == 1 and not a.shape.f_hidden]
    assert one and not any(a.success for a in one)
    assert _truth_accuracy(r.model, task, 12, seed=99) == 1.0
    assert _truth_accuracy(r.model, task, 16, seed=98) == 1.0  # beyond the checked lengths
    assert r.parameters == sum(p.numel() for p in r.model.parameters())


def test_l1_stage_keeps_accuracy(sum_last2):
    r, task = sum_last2, get_algorithmic_task("sum-last2")
    assert r.l1["nonzero_after"] <= r.l1["nonzero_before"] and r.l1["l1_norm_after"] <= r.l1["l1_norm_before"] + 1e-6
    assert r.nonzero_parameters == r.l1["nonzero_after"]
    ok, by_len = heldout_check(r.model, task, FAST, seed=5)  # a held-out set the search did not use
    assert ok and min(by_len.values()) == 1.0


def test_l1_stage_refuses_an_unsolved_network():
    task = get_algorithmic_task("parity-all")
    model = TaskRNN(task.rnn_shape(1))  # untrained: not at 100 %
    out, record = simplify_l1(model, task, config=FAST)
    assert out is model and "skipped" in record


def test_training_is_seeded():
    task = get_algorithmic_task("bitwise-and")
    cfg = SearchConfig(steps=30, eval_every=10, patience=0)
    a = train_rnn(task, task.rnn_shape(2, (4,), (4,)), seed=3, config=cfg).model
    b = train_rnn(task, task.rnn_shape(2, (4,), (4,)), seed=3, config=cfg).model
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(v, w), k


def test_checkpoint_round_trip(sum_last2, tmp_path):
    save_task_rnn(sum_last2.model, tmp_path / "m", info={"task": "sum-last2"})
    model, info = load_task_rnn(tmp_path / "m")
    assert info == {"task": "sum-last2"} and model.shape == sum_last2.shape and not model.training
    x, _ = get_algorithmic_task("sum-last2").sample(64, 12, seed=1)
    torch.testing.assert_close(model(x), sum_last2.model(x), rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match="shape.json"):
        load_task_rnn(tmp_path)


def test_zoo_entry_builds_and_reloads(tmp_path, monkeypatch):
    monkeypatch.setenv(zoo.CACHE_ENV_VAR, str(tmp_path / "cache"))
    torch.set_num_threads(1)
    spec = zoo.get("rnn-bitwise-not")
    assert spec.adapter == "generic" and spec.task == "bitwise-not"
    assert {f"rnn-{t}" for t in ("parity-last2", "add-mod-8", "base-7-addition")} <= set(zoo.models())
    loaded = zoo.load("rnn-bitwise-not", steps=300, progress=False)
    assert isinstance(loaded.model, TaskRNN) and loaded.info["success"] is True and loaded.info["accuracy"] == 1.0
    folder = zoo.model_dir("rnn-bitwise-not", steps=300)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert {"model.safetensors", "shape.json", "info.json"} <= set(manifest["files"])
    assert manifest["metrics"]["shape"] == loaded.model.shape.to_dict()
    assert _truth_accuracy(loaded.model, get_algorithmic_task("Bitwise_Not"), 12, seed=7) == 1.0
    again = zoo.load("rnn-bitwise-not", steps=300, progress=False)  # from the cache, same weights
    for v, w in zip(loaded.model.state_dict().values(), again.model.state_dict().values()):
        assert torch.equal(v, w)
