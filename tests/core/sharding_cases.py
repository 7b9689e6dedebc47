"""What the executor tests share (tests/core/test_executors.py, tests/core/test_ray_executor.py): a
prompt pair, a metric with per-prompt targets, the Result comparison and a metric that fails on cue."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import crosspatch as cp

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


def assert_same_result(got, ref):
    """Same dims, coords and metadata; values within 1e-6, baselines and AtP's list within 1e-9."""
    assert got.dims == ref.dims and got.coords == ref.coords
    np.testing.assert_allclose(got.values, ref.values, rtol=0, atol=1e-6)
    assert got.metadata["baseline"] == pytest.approx(ref.metadata["baseline"], abs=1e-9)
    if "atp" in ref.metadata:
        np.testing.assert_allclose(got.metadata["atp"], ref.metadata["atp"], rtol=0, atol=1e-6)
    drop = ("baseline", "atp")
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
