"""head_roles on a tiny GPT-2 against hand-built runs: noising activation patching, and the direct path written
as a Set at logits_in (the residual the final norm reads) with and without the primary patched."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import crosspatch as cp
from conftest import randomize, tiny_gpt2
from crosspatch.methods.head_roles import head_roles


@pytest.fixture(scope="module")
def setup():
    model = randomize(tiny_gpt2(initializer_range=0.2))
    torch.manual_seed(2)
    clean = torch.randint(2, 100, (4, 9))
    corrupt = clean.clone()
    corrupt[:, 3] = (clean[:, 3] + 17) % 98 + 2
    answer = clean[:, -1]
    metric = cp.metrics.logit_diff(answer, (answer + 1) % 100)
    m = cp.wrap(model)
    return m, clean, corrupt, metric


def _value(m, metric, out, clean):
    return float(metric(out, cp.metrics.MetricContext(torch.arange(len(clean)), out, None)).double().mean())


def _direct(m, metric, clean, corrupt, head, patched=None):
    """metric(run) - metric(run with logits_in moved by head's corrupt write minus its write in this run)."""
    layer, h = head
    corrupt_cache = m.capture(corrupt, ["head_out.*", "logits_in"])
    ivs = {} if patched is None else {f"head_out.{patched[0]}[head={patched[1]}]": cp.Patch(corrupt_cache)}
    run = m.run(clean, ivs, capture=["head_out.*", "logits_in"])
    move = corrupt_cache[f"head_out.{layer}"][:, :, h] - run.cache[f"head_out.{layer}"][:, :, h]
    moved = m.run(clean, {**ivs, "logits_in": lambda x: x + move})
    return _value(m, metric, run.output, clean) - _value(m, metric, moved.output, clean)


def test_against_hand_built_runs(setup):
    m, clean, corrupt, metric = setup
    res = head_roles(m, clean, corrupt, metric, primaries=["0.1"], threshold=0.05, progress=False)
    measures = list(res.coords["measure"])
    gap = res.metadata["gap"]
    assert gap == pytest.approx(_value(m, metric, m.run(clean).output, clean) - _value(m, metric, m.run(corrupt).output, clean))
    noising = cp.activation_patching(m, clean, corrupt, "head_out.*[head=*]", metric, direction="noising", progress=False)
    np.testing.assert_allclose(res.values[:, measures.index("total")], -noising.values.reshape(-1) / gap, atol=1e-5)
    direct = res.values[:, measures.index("direct")]
    after = res.values[:, measures.index("direct | without 0.1")]
    for i, name in enumerate(res.coords["head"]):
        site = cp.Site.parse(name)
        head = (site.layer, site.selection["head"])
        assert direct[i] == pytest.approx(_direct(m, metric, clean, corrupt, head) / gap, abs=1e-5)
        if head == (0, 1):
            assert np.isnan(after[i])
        else:
            assert after[i] == pytest.approx(_direct(m, metric, clean, corrupt, head, patched=(0, 1)) / gap, abs=1e-5)
    assert np.abs(direct).max() > 1e-2 and np.nanmax(np.abs(after - direct)) > 1e-3  # the checks are not vacuous
