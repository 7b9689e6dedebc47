"""What the executor tests share (tests/core/test_executors.py, tests/core/test_ray_executor.py): a
prompt pair, metrics with per-prompt targets, the Result comparison, a metric that fails on cue and the
fail-then-resume check."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import crosspatch as cp
from crosspatch.scale.executors import ShardError
from crosspatch.scale.shard_store import KEY_FORMAT

SITES = "head_out.*[head=*]"


def make_prompts(n: int = 6):
    """``n`` clean prompts and corrupt ones that differ at position 3."""
    torch.manual_seed(2)
    clean = torch.randint(2, 100, (n, 9))
    corrupt = clean.clone()
    corrupt[:, 3] = (clean[:, 3] + 17) % 98 + 2
    return clean, corrupt


def per_prompt_metric():
    """Different answer tokens per prompt: a row block must see global prompt indices to get them right."""
    return cp.metrics.logit_diff(list(range(10, 16)), list(range(30, 36)))


def tensor_metric():
    """The same answers as tensors, as the README builds them: a study keyed by pickled bytes never resumed."""
    return cp.metrics.logit_diff(torch.arange(10, 16), torch.arange(30, 36))


def assert_same_result(got, ref, forwards_atol: float = 0.0):
    """The local Result: same dims, coords, skipped sites and metadata; values, baselines and AtP's list
    bit-identical. A Result merged from prompt blocks states the merge's own rounding
    (``metadata["merge"]["merge_rtol"]`` times the largest |value|: 0 when merged per prompt); the test
    allows ``forwards_atol`` more where a block's smaller forwards round differently on this machine."""
    assert got.dims == ref.dims and got.coords == ref.coords
    note = got.metadata.get("merge")
    if note is None and not forwards_atol:
        np.testing.assert_array_equal(got.values, ref.values)
        assert got.metadata["baseline"] == ref.metadata["baseline"]
        if "atp" in ref.metadata:
            assert got.metadata["atp"] == ref.metadata["atp"]
    else:
        rtol = 0.0 if note is None else note["merge_rtol"]
        np.testing.assert_allclose(got.values, ref.values, rtol=0, atol=rtol * np.abs(ref.values).max() + forwards_atol)
        assert got.metadata["baseline"] == pytest.approx(ref.metadata["baseline"], rel=0, abs=forwards_atol)
        if "atp" in ref.metadata:
            np.testing.assert_allclose(got.metadata["atp"], ref.metadata["atp"], rtol=0,
                                       atol=rtol * np.abs(ref.metadata["atp"]).max() + forwards_atol)
    assert (got.skipped is None) == (ref.skipped is None)
    if ref.skipped is not None:
        np.testing.assert_array_equal(got.skipped, ref.skipped)
    drop = ("baseline", "atp", "merge")
    assert {k: v for k, v in got.metadata.items() if k not in drop} == {
        k: v for k, v in ref.metadata.items() if k not in drop
    }


class FailOnPrompt:
    """A metric that raises in the row block holding global prompt ``prompt`` while the file ``flag``
    exists, and logs the first prompt of every call to the file ``log``."""

    def __init__(self, inner, prompt, flag, log):
        self.inner, self.prompt, self.flag, self.log, self.name = inner, prompt, str(flag), str(log), inner.name

    def __call__(self, output, ctx):
        with open(self.log, "a") as f:
            f.write(f"{int(ctx.example.min())}\n")
        if os.path.exists(self.flag) and bool((ctx.example == self.prompt).any()):
            raise RuntimeError(f"injected failure for prompt {self.prompt}")
        return self.inner(output, ctx)


def model_source(source: str, request, zoo_fixture: str, factory):
    """A study's model as a sharded run takes it and as the local reference run gets it: the zoo's test
    model by name (``zoo_fixture`` registers it), ``factory`` itself, or the model it builds."""
    if source == "zoo":
        from crosspatch.zoo.sources import load_model
        from fake_zoo import FAKE

        request.getfixturevalue(zoo_fixture)
        return FAKE, cp.wrap(load_model(FAKE))
    if source == "factory":
        return factory, cp.wrap(factory())
    model = cp.wrap(factory())
    return model, model


def failing_metric(folder: Path):
    """The README's metric (tensor answers) that fails on prompt 5 until its flag file is removed:
    ``(metric, flag, log)``."""
    flag, log = folder / "fail", folder / "calls.log"
    flag.touch()
    return cp.metrics.Metric("logit_diff", FailOnPrompt(tensor_metric(), 5, flag, log)), flag, log


def fail_then_resume(run, flag, log, caplog, error: str):
    """``run()`` a 6-prompt study in blocks of 2 prompts whose metric (a :class:`FailOnPrompt` on prompt 5)
    fails while ``flag`` exists: it raises a ShardError matching ``error`` with the first two blocks saved.
    Without the flag it resumes from them, runs only the block of rows 4:6 and removes the study's folder.
    Returns the error and the resumed Result."""
    with pytest.raises(ShardError, match=error) as info:
        run()
    assert "2 of 3 shards are saved" in str(info.value)
    assert sorted(p.name.split("_")[1] for p in info.value.saved.glob("s*.json")) == ["r0-2.json", "r2-4.json"]
    assert json.loads((info.value.saved / "about.json").read_text())["key_format"] == KEY_FORMAT
    calls_before = len(Path(log).read_text().split())
    Path(flag).unlink()
    with caplog.at_level(logging.INFO, logger="crosspatch"):
        got = run()
    assert "resuming activation_patching: 2 of 3 shards loaded" in caplog.text
    assert set(Path(log).read_text().split()[calls_before:]) == {"4"}, "only the block of rows 4:6 runs again"
    assert not info.value.saved.exists(), "the study's folder is removed once it is merged"
    return info.value, got
