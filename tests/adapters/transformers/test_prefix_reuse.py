"""Prefix reuse on transformers models: a resumed run equals the full recomputation.

Every batch here holds prompts with *different* prefixes (random tokens per row, and padded rows),
so a cache taken from one prompt and reused for another would show at once.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import padded_prompts as prompts
from conftest import tiny_bert, tiny_gpt2, tiny_llama, tiny_neox

import crosspatch as cp
from crosspatch.engine.adapter import repeat_rows
from crosspatch.engine.forward import Bound, execute
from crosspatch.engine.resume import Resume

MODELS = {
    "gpt2": lambda: tiny_gpt2(n_layer=3),
    "llama": tiny_llama,
    "mistral": lambda: tiny_llama("mistral"),
    "qwen2": lambda: tiny_llama("qwen2"),
    "neox-parallel": lambda: tiny_neox(True),
    "neox-sequential": lambda: tiny_neox(False),
    "bert": tiny_bert,
}


SITES = [
    "resid_pre.1[pos=4]", "head_out.1[pos=5,head=2]", "attn_out.1[pos=6]", "mlp_act.1[pos={4,7},neuron=3:9]",
    "mlp_out.1[pos=3]", "resid_post.1[pos=last]", "mlp_out.1[pos=last]", "attn_pattern.1[pos=6]", "head_in.1[pos=5,qkv=0,head=1]",
]


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("pad", [None, "right", "left"])
def test_resumed_runs_equal_full_runs_at_every_family(name, pad):
    model = MODELS[name]()
    m = cp.wrap(model)
    base_in = m.adapter.prepare(model, prompts(0, pad=pad))
    source_in = m.adapter.prepare(model, prompts(1, pad=pad))
    sites = [cp.Site.parse(s) for s in SITES if cp.Site.parse(s).family in m.catalog]
    keys = [s.key for s in sites]
    source = execute(model, m.adapter, m.catalog, source_in, capture=keys)
    # Hooking the same sites as the patched runs, as activation_patching does: an attention-pattern
    # hook swaps in an eager attention, whose values at fully padded query rows differ from sdpa's.
    prefix = execute(model, m.adapter, m.catalog, base_in, capture=keys, keep_prefix=True).prefix
    assert prefix.causal == (name != "bert")
    inputs = repeat_rows(base_in, 2)
    checked = 0
    for site in sites:
        bounds = [Bound(site, cp.Patch(source.cache), slice(3, 6))]
        full = execute(model, m.adapter, m.catalog, inputs, bounds).output
        assert (full[3:] - full[:3]).abs().max() > 1e-6, site  # the patch changes the output
        first = min(4, site.selection["pos"] % 10 if isinstance(site.selection["pos"], int) else 4)
        for layer, pos in ((0, 0), (1, 0), (1, first), (0, 2)):
            if pos and not prefix.causal:
                continue
            resumed = execute(model, m.adapter, m.catalog, inputs, bounds, resume=Resume(prefix, layer, pos)).output
            # Left-padded query rows attend to nothing; sdpa and eager attention fill them differently.
            real = inputs["attention_mask"].bool()
            torch.testing.assert_close(resumed[real], full[real], rtol=0, atol=1e-5, msg=f"{site} from ({layer}, {pos})")
            checked += 1
    assert checked >= len(sites) * 2


@pytest.mark.parametrize("name", ["gpt2", "llama", "neox-parallel", "bert"])
@pytest.mark.parametrize("sites", ["resid_pre.*[pos=*]", "head_out.*[head=*]", "attn_out.*[pos=*]", "mlp_act.1[pos=*,neuron={0,5}]"])
def test_sweeps_with_and_without_reuse_agree(name, sites):
    model = MODELS[name]()
    m = cp.wrap(model)
    clean, corrupt = prompts(2, rows=4, pad="right"), prompts(3, rows=4, pad="right")
    answer = clean["input_ids"][:, -1]
    metric = cp.metrics.logit_diff(answer, (answer + 1) % 100)
    for direction in ("denoising", "noising"):
        kwargs = dict(direction=direction, progress=False, batch_size=24)
        reused = cp.activation_patching(m, clean, corrupt, sites, metric, **kwargs)
        full = cp.activation_patching(m, clean, corrupt, sites, metric, reuse_prefix=False, **kwargs)
        assert reused.metadata["reuse_prefix"] and not full.metadata["reuse_prefix"]
        assert np.abs(full.values).max() > 1e-4
        np.testing.assert_allclose(reused.values, full.values, rtol=0, atol=1e-5)


def test_resume_leaves_the_model_as_it_was_also_after_an_error():
    model = tiny_gpt2(n_layer=3)
    m = cp.wrap(model)
    blocks = model.transformer.h
    hooks = [(len(b._forward_pre_hooks), len(b._forward_hooks)) for b in blocks]
    inputs = m.adapter.prepare(model, prompts(4))
    prefix = execute(model, m.adapter, m.catalog, inputs, keep_prefix=True).prefix

    class Boom(cp.Zero):
        position_local = True

        def apply(self, x, ctx):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        execute(model, m.adapter, m.catalog, inputs, [Bound(cp.Site.parse("resid_pre.2[pos=5]"), Boom())], resume=Resume(prefix, 1, 3))
    assert model.transformer.h is blocks and len(blocks) == 3
    assert [(len(b._forward_pre_hooks), len(b._forward_hooks)) for b in blocks] == hooks
    assert torch.equal(m.run(inputs).output, prefix.output)


def test_models_that_cannot_resume_run_the_whole_model():
    bert_cls = tiny_bert("cls")  # a pooled output: no positions to reuse
    m = cp.wrap(bert_cls)
    assert not m.adapter.can_resume(bert_cls)
    ids = prompts(5)["input_ids"]
    result = cp.activation_patching(m, ids, prompts(6)["input_ids"], "resid_pre.*", lambda out, ctx: out[:, 0], progress=False)
    assert result.metadata["reuse_prefix"] is False
