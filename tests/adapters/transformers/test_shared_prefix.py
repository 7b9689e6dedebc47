"""Runs of inputs that share their first positions with a run already made compute only the rest.

Oracles: a whole run of the same inputs (captures and output), and AtP / EAP with an adapter that
cannot resume (every run whole). The prompts differ from row to row and are padded on either side.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import padded_prompts, tiny_bert, tiny_gpt2, tiny_llama, tiny_neox

import crosspatch as cp
from crosspatch.engine.forward import execute
from crosspatch.methods.attribution import attribution_patching
from crosspatch.methods.edges import eap, edge_graph
from crosspatch.methods.shared_prefix import capture_sharing_prefix
from crosspatch.engine.model import WrappedModel

MODELS = {
    "gpt2": lambda: tiny_gpt2(n_layer=3),
    "llama": tiny_llama,
    "mistral": lambda: tiny_llama("mistral"),
    "neox-parallel": lambda: tiny_neox(True),
    "neox-sequential": lambda: tiny_neox(False),
    "bert": tiny_bert,
}
DIFFER = 4  # the first position where the two inputs differ


def pair(pad: str | None) -> tuple[dict, dict]:
    first = padded_prompts(0, pad=pad)
    second = {"input_ids": first["input_ids"].clone(), "attention_mask": first["attention_mask"].clone()}
    second["input_ids"][:, DIFFER:] = padded_prompts(1)["input_ids"][:, DIFFER:]
    return first, second


def whole_runs(m: WrappedModel) -> WrappedModel:
    """The same model behind an adapter that cannot resume, so every run is a whole one."""

    class Whole(type(m.adapter)):
        def can_resume(self, model):
            return False

    return WrappedModel(m.module, Whole())


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("pad", [None, "right", "left"])
def test_a_run_sharing_a_prefix_equals_a_whole_run(name, pad):
    model = MODELS[name]()
    m = cp.wrap(model)
    first_in, second_in = (m.prepare(x) for x in pair(pad))
    keys = [k for k in ("embed", "head_z.0", "head_z.1", "head_in.1", "mlp_out.1", "resid_pre.1") if k.split(".")[0] in m.catalog]
    first = execute(model, m.adapter, m.catalog, first_in, capture=keys, keep_prefix=True)
    output, values, computed_from = capture_sharing_prefix(
        m, second_in, keys, None, (first_in, first.prefix, {k: first.cache[k] for k in keys})
    )
    whole = execute(model, m.adapter, m.catalog, second_in, capture=keys)
    assert computed_from == (DIFFER if name != "bert" else 0)
    real = second_in["attention_mask"].bool()  # left-padded query rows attend to nothing: any value is theirs
    torch.testing.assert_close(output[real], whole.output[real], rtol=0, atol=1e-5)
    for key in keys:
        assert values[key].shape == whole.cache[key].shape, key
        torch.testing.assert_close(values[key][real], whole.cache[key][real], rtol=0, atol=1e-5, msg=key)


@pytest.mark.parametrize("name", ["gpt2", "llama", "neox-sequential"])
@pytest.mark.parametrize("pad", [None, "left"])
def test_atp_and_eap_equal_their_whole_run_values(name, pad):
    model = MODELS[name]()
    m = cp.wrap(model)
    clean, corrupt = pair(pad)
    metric = cp.metrics.logit_diff(torch.tensor([5, 6, 7]), torch.tensor([8, 9, 10]))
    whole = whole_runs(m)
    for direction in ("denoising", "noising"):
        shared = attribution_patching(m, clean, corrupt, ["head_out.*[head=*]", "resid_pre.*[pos=*]"], metric, direction=direction)
        alone = attribution_patching(whole, clean, corrupt, ["head_out.*[head=*]", "resid_pre.*[pos=*]"], metric, direction=direction)
        assert shared.metadata["shared_positions"] == DIFFER and alone.metadata["shared_positions"] == 0
        np.testing.assert_allclose(shared.values, alone.values, rtol=1e-4, atol=1e-6 * np.abs(alone.values).max())
    graph = edge_graph(m)
    shared, alone = eap(m, clean, corrupt, metric, graph=graph), eap(whole, clean, corrupt, metric, graph=graph)
    assert shared.metadata["shared_positions"] == DIFFER and alone.metadata["shared_positions"] == 0
    np.testing.assert_allclose(shared.values, alone.values, rtol=1e-4, atol=1e-6 * np.abs(alone.values).max())
    # zero ablation has no ablated run to share anything with
    assert eap(m, clean, None, metric, ablation="zero", graph=graph).metadata["shared_positions"] == 0


@pytest.mark.parametrize("name", ["gpt2", "llama", "neox-sequential"])
@pytest.mark.parametrize("shared", [True, False])
def test_eap_scoring_head_inputs_in_the_backward_equals_scoring_their_gradients(name, shared):
    """EAP scores ``head_in`` edges as the backward makes each slot's gradient (never writing them all);
    one-step EAP-IG reads the whole per-slot gradients: the same numbers, with grouped keys and values too."""
    from crosspatch.methods.edges import _gradient_run, EdgePatcher, eap_ig

    model = MODELS[name]()
    m = cp.wrap(model)
    clean, corrupt = pair("left")
    if not shared:
        corrupt["input_ids"][:, 0] = (corrupt["input_ids"][:, 0] + 1) % 100
    metric = cp.metrics.logit_diff(torch.tensor([5, 6, 7]), torch.tensor([8, 9, 10]))
    graph = edge_graph(m)
    fused, whole = eap(m, clean, corrupt, metric, graph=graph), eap_ig(m, clean, corrupt, metric, steps=1, graph=graph)
    assert fused.metadata["shared_positions"] == (DIFFER if shared else 0)
    np.testing.assert_allclose(fused.values, whole.values, rtol=1e-4, atol=1e-6 * np.abs(whole.values).max())
    p = EdgePatcher(m, clean, corrupt, "resample", None, graph)
    scored = _gradient_run(p, metric, [], 1, score=True)[4]
    assert sorted(scored) == sorted(k for k, _, _ in graph.receiver_keys if k.startswith("head_in"))
