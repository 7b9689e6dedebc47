"""Activation patching on tiny transformers, checked against invariants and a hand-written loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import crosspatch as cp
from conftest import tiny_gpt2, tiny_llama


def _metric(clean):
    answer = clean[:, -1]
    return cp.metrics.logit_diff(answer, (answer + 1) % 100)


def _loop(m, clean, corrupt, sites, metric, direction="denoising"):
    """One forward per site through the public run API: the reference the batched sweep must equal."""
    base, source = (corrupt, clean) if direction == "denoising" else (clean, corrupt)
    sweep = m.catalog.expand(sites, {"pos": clean.shape[1]})
    baseline = metric(m.run(base).output)
    values = [
        (metric(m.run(base, {site: cp.Patch(source)}).output) - baseline).mean().item() for site in sweep.sites
    ]
    return np.array(values).reshape(sweep.shape)


@pytest.mark.parametrize("direction", ["denoising", "noising"])
@pytest.mark.parametrize("sites", ["head_out.*[head=*]", "head_out.1[pos=*,head=1]", "resid_pre.*[pos=*]", "mlp_out.1[pos=*]"])
def test_batched_sweep_equals_one_site_at_a_time(gpt2, pair, direction, sites):
    clean, corrupt = pair
    m = cp.wrap(gpt2)
    metric = _metric(clean)
    batched = cp.activation_patching(m, clean, corrupt, sites, metric, direction=direction, batch_size=64)
    single = cp.activation_patching(m, clean, corrupt, sites, metric, direction=direction, batch_size=1)
    loop = _loop(m, clean, corrupt, sites, metric, direction)
    np.testing.assert_allclose(batched.values, loop, atol=1e-5)
    np.testing.assert_allclose(single.values, batched.values, atol=1e-5)


def test_grouped_query_attention_head_sweep_matches_loop(pair):
    clean, corrupt = pair
    m = cp.wrap(tiny_llama())
    metric = _metric(clean)
    result = cp.activation_patching(m, clean, corrupt, "head_out.*[head=*]", metric)
    assert result.dims == ("layer", "head") and result.values.shape == (2, 4)
    np.testing.assert_allclose(result.values, _loop(m, clean, corrupt, "head_out.*[head=*]", metric), atol=1e-5)


@pytest.mark.parametrize("direction", ["denoising", "noising"])
def test_identical_clean_and_corrupt_give_zero_everywhere(gpt2, pair, direction):
    clean, _ = pair
    for sites in ["head_out.*[head=*]", "resid_pre.*[pos=*]", "attn_pattern.*[head=*]"]:
        kwargs = dict(direction=direction, skip_unchanged=False)  # run every site, so the engine is tested
        result = cp.activation_patching(gpt2, clean, clean, sites, _metric(clean), reuse_prefix=False, **kwargs)
        assert np.all(result.values == 0.0), sites
        # Resuming at later positions attends over cached keys in a differently shaped kernel: float rounding only.
        reused = cp.activation_patching(gpt2, clean, clean, sites, _metric(clean), **kwargs)
        np.testing.assert_allclose(reused.values, 0.0, atol=1e-6, err_msg=sites)
        skipped = cp.activation_patching(gpt2, clean, clean, sites, _metric(clean), direction=direction)
        assert skipped.metadata["sites_run"] == 0 and np.all(skipped.values == 0.0)
    kl = cp.activation_patching(gpt2, clean, clean, "resid_post.*", cp.metrics.kl_to_clean(), direction=direction)
    np.testing.assert_allclose(kl.values, 0.0, atol=1e-7)


def test_first_layer_residual_restores_exactly_at_the_corrupted_position(gpt2, pair):
    clean, corrupt = pair  # they differ at position 3 only
    expected = np.zeros(clean.shape[1])
    expected[3] = 1.0
    for reuse, atol in ((False, 1e-5), (True, 1e-4)):  # normalised by a small gap: rounding grows with it
        result = cp.activation_patching(
            gpt2, clean, corrupt, "resid_pre.0[pos=*]", _metric(clean), normalize=True, reuse_prefix=reuse
        )
        np.testing.assert_allclose(result.values, expected, atol=atol)
    # Patching the last residual at the last position hands over the clean logits there.
    last = cp.activation_patching(gpt2, clean, corrupt, "resid_post.1[pos=-1]", _metric(clean), normalize=True)
    assert last.dims == () and abs(float(last.values) - 1.0) < 1e-5


def test_denoising_positions_before_the_corruption_do_nothing_in_a_causal_model(gpt2, pair):
    clean, corrupt = pair
    result = cp.activation_patching(gpt2, clean, corrupt, "resid_post.*[pos=*]", _metric(clean))
    assert np.all(result.values[:, :3] == 0.0)  # positions < 3 are identical in both runs


def test_result_metadata_and_outputs(gpt2, pair, tmp_path):
    clean, corrupt = pair
    result = cp.activation_patching(gpt2, clean, corrupt, "head_out.*[head=*]", _metric(clean))
    meta = result.metadata
    assert meta["method"] == "activation_patching" and meta["metric"] == "logit_diff"
    assert meta["adapter"] == "transformers" and meta["model"]["class"] == "GPT2LMHeadModel"
    assert meta["direction"] == "denoising" and meta["n_prompts"] == 4
    assert {"torch", "crosspatch", "transformers"} <= set(meta["versions"])
    assert meta["baseline"]["clean"] != meta["baseline"]["corrupt"]
    frame = result.to_pandas()
    assert list(frame.columns) == ["layer", "head", "value"] and len(frame) == 8
    loaded = cp.Result.load(result.save(tmp_path / "heads"))
    np.testing.assert_array_equal(loaded.values, result.values)
    result.plot().savefig(tmp_path / "heads.png")
    assert (tmp_path / "heads.png").stat().st_size > 1000


def test_any_callable_metric(gpt2, pair):
    clean, corrupt = pair
    answer = clean[0, -1].item()

    def last_logit(logits):
        return logits[:, -1, answer]

    m = cp.wrap(gpt2)
    result = cp.activation_patching(m, clean, corrupt, "attn_out.*", last_logit)
    assert result.metadata["metric"] == "last_logit"
    np.testing.assert_allclose(result.values, _loop(m, clean, corrupt, "attn_out.*", last_logit), atol=1e-5)
    with pytest.raises(ValueError, match="one value per batch row"):
        cp.activation_patching(m, clean, corrupt, "attn_out.*", lambda logits: logits.sum())


def test_bad_inputs_are_refused(gpt2, pair):
    clean, corrupt = pair
    with pytest.raises(ValueError, match="same|match"):
        cp.activation_patching(gpt2, clean, corrupt[:, :-1], "attn_out.*", _metric(clean))
    with pytest.raises(ValueError, match="direction"):
        cp.activation_patching(gpt2, clean, corrupt, "attn_out.*", _metric(clean), direction="sideways")
    with pytest.raises(cp.SiteError, match="head_out"):
        cp.activation_patching(gpt2, clean, corrupt, "head_outt.*", _metric(clean))


@pytest.mark.parametrize("direction", ["denoising", "noising"])
def test_sites_whose_source_equals_the_base_are_not_run(gpt2, pair, direction):
    clean, corrupt = pair  # they differ at position 3 only: earlier positions are equal at every layer,
    n_layers, length = gpt2.config.n_layer, clean.shape[1]  # and the embeddings differ at position 3 alone
    run_all = cp.activation_patching(gpt2, clean, corrupt, "resid_pre.*[pos=*]", _metric(clean), direction=direction, skip_unchanged=False)
    skipped = cp.activation_patching(gpt2, clean, corrupt, "resid_pre.*[pos=*]", _metric(clean), direction=direction)
    assert run_all.metadata["sites_run"] == n_layers * length
    assert skipped.metadata["sites_run"] == 1 + (n_layers - 1) * (length - 3)
    np.testing.assert_allclose(skipped.values, run_all.values, rtol=0, atol=1e-6)
    assert np.all(skipped.values[:, :3] == 0.0) and np.abs(skipped.values[:, 3:]).max() > 1e-3


def test_a_sweep_on_a_cpu_runs_one_sites_prompts_per_forward_unless_told():
    """batch_size=None: one site per forward on a CPU (a loop's peak memory), the same values as 64 rows."""
    from crosspatch.methods.pairs import rows_per_forward

    model = tiny_gpt2()
    m = cp.wrap(model)
    assert rows_per_forward(None, m, 5) == 5 and rows_per_forward(12, m, 5) == 12
    torch.manual_seed(0)
    clean = torch.randint(0, 100, (3, 6))
    corrupt = clean.clone()
    corrupt[:, 0] = (corrupt[:, 0] + 1) % 100
    metric = lambda out, ctx: out[:, -1, 0] - out[:, -1, 1]  # noqa: E731
    seen = {"default": [], "batched": []}
    runs = {}
    for name, batch_size in (("default", None), ("batched", 64)):
        hook = model.transformer.h[1].register_forward_pre_hook(lambda mod, args, name=name: seen[name].append(args[0].shape[0]))
        try:
            runs[name] = cp.activation_patching(m, clean, corrupt, "head_out.1[head=*]", metric, progress=False,
                                                batch_size=batch_size)
        finally:
            hook.remove()
    assert max(seen["default"]) == 12 and max(seen["batched"]) == 12  # the four heads share a start: one forward
    np.testing.assert_allclose(runs["default"].values, runs["batched"].values, rtol=0, atol=1e-6)
