"""Numbers that cannot mislead: normalising by a zero gap raises with both baselines; the progress bar
of activation patching counts sites."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import crosspatch as cp
import importlib

ap_module = importlib.import_module("crosspatch.methods.activation_patching")


def test_normalize_with_no_gap_raises_naming_both_baselines(gpt2, ids):
    m = cp.wrap(gpt2)
    metric = cp.metrics.logit_diff(5, 7)
    for method, options in ((cp.activation_patching, {"progress": False}), (cp.attribution_patching, {})):
        with pytest.raises(ValueError, match=r"gap of logit_diff, which is 0 \(clean -?\d.*, corrupt -?\d.*\).*"
                                             r"normalize=False"):
            method(m, ids, ids, "resid_pre.*", metric, normalize=True, **options)
    with pytest.raises(ValueError, match=r"source-base gap of logit_diff.*\(source .*, base .*\)"):
        cp.path_patching(m, ids, ids, "head_out.0[head=*]", "resid_post.1", metric, normalize=True)
    # a real gap still normalises
    corrupt = ids.clone()
    corrupt[:, 4] = (ids[:, 4] + 11) % 98 + 2
    res = cp.activation_patching(m, ids, corrupt, "resid_pre.0", metric, normalize=True, progress=False)
    np.testing.assert_allclose(res.values, 1.0, atol=1e-5)


def test_the_progress_bar_counts_sites_not_forwards(gpt2, ids, monkeypatch):
    bars = []

    class Bar:
        def __init__(self, items, enabled, **kwargs):
            self.total, self.kwargs, self.n, self.closed = len(items), kwargs, 0, False
            bars.append(self)

        def update(self, k):
            self.n += k

        def close(self):
            self.closed = True

    monkeypatch.setattr(ap_module, "progress_bar", Bar)
    corrupt = ids.clone()
    corrupt[:, 2] = (ids[:, 2] + 11) % 98 + 2
    res = cp.activation_patching(cp.wrap(gpt2), ids, corrupt, "resid_pre.*[pos=*]", cp.metrics.logit_diff(5, 7),
                                 batch_size=4 * ids.shape[0])
    (bar,) = bars
    assert bar.total == bar.n == res.metadata["sites_run"] == int((~res.skipped).sum())
    assert bar.kwargs["unit"] == "site" and bar.closed
