"""A run whose metric reads one position computes the LM head there only: same numbers, same gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import crosspatch as cp
from conftest import randomize, tiny_gpt2, tiny_llama
from crosspatch.engine.forward import Bound, execute
from crosspatch.methods.attribution import attribution_patching
from crosspatch.methods.edges import eap, eap_ig
from crosspatch.results.metrics import Metric, MetricContext


def _padded(side: str) -> dict:
    torch.manual_seed(4)
    ids = torch.randint(2, 100, (3, 8))
    mask = torch.ones_like(ids)
    if side == "right":
        mask[0, 5:] = 0
        mask[2, 7:] = 0
    else:
        mask[0, :3] = 0
        mask[1, :1] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_llama], ids=["gpt2", "llama"])
@pytest.mark.parametrize("side", ["right", "left", "none"])
def test_output_at_the_metric_positions_equals_the_full_output_there(make, side):
    m = cp.wrap(randomize(make()))
    inputs = m.prepare(_padded(side) if side != "none" else torch.randint(2, 100, (3, 8)))
    ctx = MetricContext(torch.arange(3), None, inputs.get("attention_mask"))
    positions = cp.metrics.logit_diff(5, 6).positions(ctx, m.adapter.sizes(inputs))
    if side == "right":
        assert positions.tolist() == [4, 7, 6]  # each row's last real token
    else:
        assert positions.tolist() == [7, 7, 7]
    full = execute(m.module, m.adapter, m.catalog, inputs).output
    part = execute(m.module, m.adapter, m.catalog, inputs, output_at=positions).output
    rows = torch.arange(3)
    assert part.shape == full.shape
    torch.testing.assert_close(part[rows, positions], full[rows, positions], atol=1e-5, rtol=0)
    elsewhere = torch.ones(full.shape[:2], dtype=torch.bool)
    elsewhere[rows, positions] = False
    assert torch.all(part[elsewhere] == 0) and torch.all(full[elsewhere] != 0)
    assert all(not mod._forward_hooks and not mod._forward_pre_hooks for mod in m.module.modules())


def test_a_run_that_reads_or_writes_the_logits_computes_them_everywhere(gpt2, ids):
    m = cp.wrap(gpt2)
    inputs = m.prepare(ids)
    last = torch.full((ids.shape[0],), ids.shape[1] - 1)
    full = execute(m.module, m.adapter, m.catalog, inputs).output
    run = execute(m.module, m.adapter, m.catalog, inputs, capture=["logits"], output_at=last)
    torch.testing.assert_close(run.output, full, atol=0, rtol=0)
    torch.testing.assert_close(run.cache["logits"], full, atol=0, rtol=0)
    scaled = execute(m.module, m.adapter, m.catalog, inputs, [Bound(cp.Site.parse("logits[pos=0]"), cp.Scale(2.0))], output_at=last)
    torch.testing.assert_close(scaled.output[:, 0], 2 * full[:, 0], atol=1e-6, rtol=0)


def test_the_last_mlp_runs_at_the_positions_only_when_no_site_reads_it(gpt2, ids):
    m = cp.wrap(gpt2)
    inputs = m.prepare(ids)
    last = torch.full((ids.shape[0],), ids.shape[1] - 1)
    full = execute(m.module, m.adapter, m.catalog, inputs, capture=["mlp_out.1", "mlp_out.0"])
    seen = []
    handle = gpt2.transformer.h[1].mlp.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[1]))
    try:
        early = execute(m.module, m.adapter, m.catalog, inputs, capture=["mlp_out.0"], output_at=last)
        late = execute(m.module, m.adapter, m.catalog, inputs, capture=["mlp_out.1"], output_at=last)
        # mlp_in is the norm's input, in front of the MLP: reading or writing it leaves the MLP restricted
        scaled = [Bound(cp.Site.parse("mlp_in.1"), cp.Scale(1.5))]
        written = execute(m.module, m.adapter, m.catalog, inputs, scaled, capture=["mlp_in.1"], output_at=last)
    finally:
        handle.remove()
    assert seen == [1, ids.shape[1], 1]  # restricted unless the MLP's own values are read
    whole = execute(m.module, m.adapter, m.catalog, inputs, scaled, capture=["mlp_in.1"])
    torch.testing.assert_close(written.cache["mlp_in.1"], whole.cache["mlp_in.1"], atol=0, rtol=0)
    torch.testing.assert_close(written.output[:, -1], whole.output[:, -1], atol=1e-5, rtol=0)
    torch.testing.assert_close(early.cache["mlp_out.0"], full.cache["mlp_out.0"], atol=0, rtol=0)
    torch.testing.assert_close(late.cache["mlp_out.1"], full.cache["mlp_out.1"], atol=0, rtol=0)
    for run in (early, late):
        torch.testing.assert_close(run.output[:, -1], full.output[:, -1], atol=1e-5, rtol=0)


def test_the_last_attention_projection_runs_at_the_positions_only_when_nothing_reads_what_it_feeds(gpt2, ids):
    """The last block's attention output projection reaches only the last MLP and the head: restricted with them,
    unless a site it is summed into is read (head_out, attn_out, resid_mid, mlp_in of that block); then every
    read value equals a whole run's. Sites before it (head_z, head_in) are read whole either way."""
    m = cp.wrap(gpt2)
    inputs = m.prepare(ids)
    last = torch.full((ids.shape[0],), ids.shape[1] - 1)
    reads = ["head_z.1", "head_in.1", "head_out.1", "attn_out.1", "resid_mid.1", "mlp_in.1"]
    full = execute(m.module, m.adapter, m.catalog, inputs, capture=reads)
    proj = gpt2.transformer.h[1].attn.c_proj
    seen, forward = [], proj.forward
    proj.forward = lambda x: (seen.append(x.shape[1]), forward(x))[1]  # the module's own input, after any pre-hook
    try:
        runs = {key: execute(m.module, m.adapter, m.catalog, inputs, capture=[key], output_at=last) for key in reads}
        only = execute(m.module, m.adapter, m.catalog, inputs, capture=["mlp_in.1"], output_at=last, output_only=["mlp_in.1"])
    finally:
        del proj.forward
    assert seen == [1, 1] + [ids.shape[1]] * 4 + [1]
    for key, run in runs.items():
        torch.testing.assert_close(run.cache[key], full.cache[key], atol=0, rtol=0)
        torch.testing.assert_close(run.output[:, -1], full.output[:, -1], atol=1e-5, rtol=0)
    rows = torch.arange(ids.shape[0])  # read at the output positions only, as output_only says
    torch.testing.assert_close(only.cache["mlp_in.1"][rows, last], full.cache["mlp_in.1"][rows, last], atol=1e-6, rtol=0)
    torch.testing.assert_close(only.output[:, -1], full.output[:, -1], atol=1e-5, rtol=0)


def test_hooks_go_on_error_and_bad_positions_are_refused(gpt2, ids):
    m = cp.wrap(gpt2)
    inputs = m.prepare(ids)

    class Boom(cp.Intervention):
        def apply(self, x, ctx):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        execute(m.module, m.adapter, m.catalog, inputs, [Bound(cp.Site.parse("resid_pre.1"), Boom())],
                output_at=torch.zeros(ids.shape[0], dtype=torch.long))
    assert all(not mod._forward_hooks and not mod._forward_pre_hooks for mod in gpt2.modules())
    with pytest.raises(ValueError, match=r"one position per row: shape \(3,\)"):
        execute(m.module, m.adapter, m.catalog, inputs, output_at=torch.zeros(2, dtype=torch.long))


def _everywhere(metric: Metric) -> Metric:
    """The same metric with no declared position: its runs compute the output everywhere."""
    return Metric(metric.name, metric.fn)


@pytest.mark.parametrize("metric", ["logit_diff", "kl_to_clean"])
def test_attribution_and_eap_are_unchanged_by_the_restriction(pair, metric):
    model = randomize(tiny_gpt2(initializer_range=0.2))  # large effects, so KL's gradient is far from float error
    clean, corrupt = pair
    fn = cp.metrics.logit_diff(clean[:, -1], (clean[:, -1] + 1) % 100) if metric == "logit_diff" else cp.metrics.kl_to_clean()
    # KL to clean is at its minimum on the clean run: its gradient there is float error, so noising only for logit_diff.
    for direction in ("denoising", "noising") if metric == "logit_diff" else ("denoising",):
        # With mlp_out.1 the last MLP is read, so only the head is restricted; with heads alone the MLP is too.
        for sites in (["head_out.*[head=*]", "resid_pre.*[pos=*]", "mlp_out.*"], "head_out.*[head=*]"):
            fast = attribution_patching(model, clean, corrupt, sites, fn, direction=direction, grad_drop=True)
            slow = attribution_patching(model, clean, corrupt, sites, _everywhere(fn), direction=direction, grad_drop=True)
            assert np.abs(slow.values).max() > 1e-4
            np.testing.assert_allclose(fast.values, slow.values, rtol=1e-5, atol=1e-7)
            assert fast.metadata["baseline"] == pytest.approx(slow.metadata["baseline"], rel=1e-6, abs=1e-7)
    unshared = corrupt.clone()  # differs at position 0 too: the corrupt run shares no prefix with the clean one
    unshared[:, 0] = (clean[:, 0] + 5) % 98 + 2
    for other in (corrupt, unshared):
        seen = []  # positions the last MLP computes: EAP reads its write only through logits_in's gradient
        handle = model.transformer.h[-1].mlp.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[1]))
        try:
            fast = eap(model, clean, other, fn)
        finally:
            handle.remove()
        assert seen == [1, 1]  # the run with gradients and the corrupt run, with a shared prefix or without
        assert fast.metadata["shared_positions"] == (3 if other is corrupt else 0)
        np.testing.assert_allclose(fast.values, eap(model, clean, other, _everywhere(fn)).values, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(eap_ig(model, clean, corrupt, fn, steps=2).values,
                               eap_ig(model, clean, corrupt, _everywhere(fn), steps=2).values, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("side", ["right", "left"])
def test_activation_patching_is_unchanged_by_the_restriction(side):
    """Patched runs resume at later positions: their output positions shift with the resumed window."""
    m = cp.wrap(randomize(tiny_gpt2(initializer_range=0.2)))
    clean = _padded(side)
    corrupt = {**clean, "input_ids": clean["input_ids"].clone()}
    corrupt["input_ids"][:, 4] = (corrupt["input_ids"][:, 4] + 7) % 98 + 2
    fn = cp.metrics.logit_diff(clean["input_ids"][:, -1], (clean["input_ids"][:, -1] + 1) % 100)
    for sites in ("resid_pre.*[pos=*]", "head_out.*[head=*]", "mlp_out.1[pos=*]"):
        fast = cp.activation_patching(m, clean, corrupt, sites, fn)
        slow = cp.activation_patching(m, clean, corrupt, sites, _everywhere(fn))
        assert np.abs(slow.values).max() > 1e-3
        np.testing.assert_allclose(fast.values, slow.values, rtol=1e-5, atol=1e-6)
