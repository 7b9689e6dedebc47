"""cross_modal_flow on a tiny random LLaVA: its batched windows against one knockout run per window, edges that
carry no attention at exactly 0, intervals around the means."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import crosspatch as cp
from crosspatch.adapters.vlm import VLMAdapter
from crosspatch.engine.knockout import Knockout, bind
from crosspatch.methods.vlm_flow import cross_modal_flow, layer_windows

from .tiny import tiny_llava, vlm_inputs


@pytest.fixture(scope="module")
def m():
    return cp.wrap(tiny_llava(num_hidden_layers=3).double(), VLMAdapter())


def test_layer_windows_are_cut_at_the_ends():
    assert layer_windows(5, 3) == [(0, 2), (0, 3), (1, 4), (2, 5), (3, 5)]
    assert layer_windows(3, 9) == [(0, 3)] * 3
    with pytest.raises(ValueError, match="at least 1"):
        layer_windows(3, 0)


def test_flow_equals_one_knockout_run_per_window(m):
    items = vlm_inputs(rows=3, pad=2)
    edges = {"image -> question": ("image", "question"), "question -> last": ("question", "last"),
             "last -> image": ("last", "image")}  # image queries never see the last token (causal): no attention
    flow = cross_modal_flow(m, items, edges, window=1, n_boot=200, windows_per_forward=2)
    assert flow.per_item.shape == (3, 3, 3)
    inputs = m.prepare(items)
    last = inputs["group.last"].float().argmax(1)
    rows = torch.arange(3)
    plain = m.run(inputs, capture=["attn_pattern.0"]).output[rows, last].softmax(-1)
    answer = plain.argmax(-1)
    for layer in range(3):
        out = m.run(inputs, bind(m, inputs, [Knockout("question", "last", layers=layer)])).output
        p = out[rows, last].softmax(-1)[rows, answer]
        expected = 100 * (p - plain[rows, answer]) / plain[rows, answer]
        np.testing.assert_allclose(flow.per_item[1, layer], expected.numpy(), rtol=1e-9, atol=1e-9)
    # Zero up to float64 rounding: the windows batched into one forward round differently from the plain run
    # on some CPUs (1.7e-14 measured with AVX-512); the two edges that carry attention move it by 0.08 to 8.
    assert np.all(np.abs(flow.per_item[2]) < 1e-12) and np.all(np.abs(flow.ci_low[2]) < 1e-12)
    assert np.all(np.abs(flow.ci_high[2]) < 1e-12)
    assert np.any(flow.per_item[:2] != 0)
    assert np.all(flow.ci_low <= flow.change + 1e-12) and np.all(flow.change <= flow.ci_high + 1e-12)
    result = flow.to_result()
    assert result.dims == ("edges", "layer", "stat") and result.values.shape == (3, 3, 3)


def test_missing_group_is_named(m):
    items = vlm_inputs()
    del items["groups"]
    with pytest.raises(ValueError, match="question"):
        cross_modal_flow(m, items, window=1, n_boot=10)
