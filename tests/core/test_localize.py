"""cp.localize: verified effects are activation patching's own values, tol=0 is the exhaustive sweep,
planted heads are found, and the forwards it reports are the rows it ran."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import crosspatch as cp
from crosspatch.methods.localize import LEVELS, Localization, level_patterns, localize

from conftest import tiny_gpt2

PLANTED = [(1, 2), (2, 0)]
DATA = Path(__file__).resolve().parents[1] / "data"


def close(got, want):
    """Verified values are activation_patching's; the sweep batches sites into forwards differently, so the
    last float32 bits may differ (measured up to 2.2e-7)."""
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def _planted(scale: float = 8.0, heads=PLANTED, n_head: int = 4, tokens: int = 8, at: int = 3, seed: int = 0,
             shift: int = 17, n_layer: int = 3):
    """A GPT-2 (d 64) with the output projections of ``heads`` scaled up, 4 prompts of ``tokens`` tokens
    corrupted at position ``at`` and the logit difference the corruption moves most. The default: 3 layers
    of 4 heads, heads 1.2 and 2.0 planted, the pair differing at position 3."""
    model = tiny_gpt2(n_layer=n_layer, n_head=n_head)
    d_head = 64 // n_head
    with torch.no_grad():
        for layer, head in heads:
            model.transformer.h[layer].attn.c_proj.weight[head * d_head : (head + 1) * d_head] *= scale
    gen = torch.Generator().manual_seed(seed)
    clean = torch.randint(2, 100, (4, tokens), generator=gen)
    corrupt = clean.clone()
    corrupt[:, at] = (clean[:, at] + shift) % 98 + 2
    with torch.no_grad():
        moved = model(clean).logits[:, -1] - model(corrupt).logits[:, -1]
    return cp.wrap(model), clean, corrupt, cp.metrics.logit_diff(moved.argmax(-1), moved.argmin(-1))


@pytest.fixture(scope="module")
def planted():
    return _planted()


@pytest.fixture(scope="module")
def sweeps(planted):
    """activation_patching of every pattern of every level (start="components"), normalised."""
    m, clean, corrupt, metric = planted
    patterns = dict.fromkeys(p for lv in LEVELS[:4] for p in level_patterns(lv))
    return {p: cp.activation_patching(m, clean, corrupt, p, metric, normalize=True, progress=False) for p in patterns}


def test_verified_effects_are_activation_patchings_values(planted, sweeps):
    m, clean, corrupt, metric = planted
    loc = localize(m, clean, corrupt, metric, normalize=True, tol=0.05)
    checked = 0
    for pattern, res in loc.sweeps.items():
        verified = np.array(res.metadata["verified"], dtype=bool)
        assert verified.shape == res.values.shape
        close(res.values[verified], sweeps[pattern].values[verified])
        estimate = np.array(res.metadata["estimate"])
        np.testing.assert_array_equal(res.values[~verified], estimate[~verified])
        checked += int(verified.sum())
    assert 0 < checked == len(loc.verified)
    assert sum(r.metadata["verified_count"] for r in loc.levels.values()) >= checked  # shared sites counted per level
    # the same for sites given as a list: one call of activation_patching on the verified sites
    sites = sorted(loc.verified)
    again = cp.activation_patching(m, clean, corrupt, sites, metric, normalize=True, progress=False)
    close(again.values, np.array([loc.verified[s] for s in sites]))


def test_noising_verifies_with_noising_patching(planted):
    m, clean, corrupt, metric = planted
    loc = localize(m, clean, corrupt, metric, tol=0.05, direction="noising", levels=["layer", "component_pos"])
    assert loc.estimates.metadata["direction"] == "noising"
    checked = 0
    for pattern in level_patterns("component_pos"):
        exact = cp.activation_patching(m, clean, corrupt, pattern, metric, direction="noising", progress=False)
        res = loc.sweep(pattern)
        verified = np.array(res.metadata["verified"], dtype=bool)
        checked += int(verified.sum())
        close(res.values[verified], exact.values[verified])
    assert checked


def test_tolerance_zero_verifies_everything_and_is_the_exhaustive_sweep(planted, sweeps):
    m, clean, corrupt, metric = planted
    loc = localize(m, clean, corrupt, metric, normalize=True, tol=0)
    for name, res in loc.levels.items():
        assert all(res.metadata["verified"]), name
        assert res.metadata["max_unverified_bound"] == 0.0
    for pattern, res in loc.sweeps.items():
        assert res.dims == sweeps[pattern].dims and res.coords == sweeps[pattern].coords
        close(res.values, sweeps[pattern].values)
        # localize's ranking is the sweep's, up to sites whose effects differ by rounding
        ranked = np.abs(sweeps[pattern].values.reshape(-1))[np.argsort(-np.abs(res.values.reshape(-1)), kind="stable")]
        assert (np.diff(ranked) <= 2e-6).all()
        skipped = sweeps[pattern].skipped
        assert np.array(res.metadata["skipped"]).tolist() == skipped.tolist()  # positions before 3 are not run
    fine = sum(sweeps[p].metadata["sites_run"] for p in level_patterns("component_pos"))
    assert loc.forwards > fine + 2  # everything, plus AtP* and the coarser levels


def test_the_planted_heads_are_found(planted):
    m, clean, corrupt, metric = planted
    loc = localize(m, clean, corrupt, metric, normalize=True, tol=0.05, levels=LEVELS[:4])  # whole heads too
    heads = loc.top(2, level="component")
    assert set(heads["site"]) == {f"head_out.{layer}[head={head}]" for layer, head in PLANTED}
    assert heads["verified"].all()
    fine = loc.top(3)  # the finest level: the planted heads' writes at the last position lead it
    assert {f"head_out.{layer}[pos=7,head={head}]" for layer, head in PLANTED} <= set(fine["site"])
    assert fine["verified"].all()
    # fewer sites verified than listed: the rule stopped
    finest = loc.levels["component_pos"]
    assert finest.metadata["verified_count"] < finest.values.size
    assert finest.metadata["max_unverified_bound"] < finest.metadata["threshold"]


def _truth(m, sweeps) -> dict[str, float]:
    truth = {}
    for p in level_patterns("component_pos"):
        sweep = m.catalog.expand(p, {"pos": 8})
        truth.update(zip(map(str, sweep.sites), sweeps[p].values.reshape(-1).tolist()))
    return truth


def test_with_k_the_top_k_are_verified_and_the_threshold_rises(planted, sweeps):
    m, clean, corrupt, metric = planted
    truth = _truth(m, sweeps)
    top3 = sorted(truth, key=lambda s: -abs(truth[s]))[:3]
    for estimator in ("atp", "atp*"):
        loc = localize(m, clean, corrupt, metric, normalize=True, tol=0.0, k=3, estimator=estimator)
        res = loc.levels["component_pos"]
        assert res.metadata["threshold"] > 0  # the 3rd largest exact effect, not tol
        assert set(top3) <= set(loc.verified)
        assert set(loc.top(3)["site"]) == set(top3)
        assert res.metadata["verified_count"] < res.values.size
    # the planted head 1.2 at the corrupted position, which AtP* puts at less than half its effect
    missed = "head_out.1[pos=3,head=2]"
    assert missed in top3 and loc.estimates.values[loc.estimates.coords["site"].index(missed)] < truth[missed] / 2


@pytest.mark.parametrize("estimator", ["atp", "atp*"])
def test_the_layer_level_catches_what_atp_cannot_see(estimator):
    """tracr's hist: the attention is saturated, so AtP puts 0 (to 1e-6) on every head's write although the
    heads carry the output (AtP* too; it also zeroes the MLP, its GradDrop dropping the only layer).
    Verifying the estimates' ranking alone misses the heads; the layers, always patched, leave their effect
    unexplained by children estimated at 0, which sends localize down to every one of them."""
    from crosspatch.adapters.tracr import TracrAdapter, load, output_score

    model = load(DATA / "tracr", "hist")
    m = cp.wrap(model, TracrAdapter())
    refs = [r["ids"] for r in json.loads((DATA / "tracr" / "hist.json").read_text())["reference"]]
    ids = torch.tensor([r for r in refs if len(r) == 6])
    gen = torch.Generator().manual_seed(0)
    clean, corrupt = (ids[torch.randperm(len(ids), generator=gen)[:8]] for _ in range(2))
    metric = output_score(model.categorical)
    loc = localize(m, clean, corrupt, metric, tol=0.05, estimator=estimator)
    flat = localize(m, clean, corrupt, metric, tol=0.05, levels=["component_pos"], estimator=estimator)
    blind = 0
    for pattern in level_patterns("component_pos"):
        exact = cp.activation_patching(m, clean, corrupt, pattern, metric, progress=False)
        big = np.abs(exact.values) >= 0.05 * loc.metadata["scale"]
        assert big.any()
        estimate = np.abs(np.array(loc.sweep(pattern).metadata["estimate"]))
        unseen = big & (estimate <= 1e-6 * loc.metadata["scale"])  # AtP's blind spot
        blind += int(unseen.sum())
        assert not np.array(flat.sweep(pattern).metadata["verified"])[unseen].any()
        found = loc.sweep(pattern)
        assert np.array(found.metadata["verified"])[big].all()
        close(found.values[big], exact.values[big])
    assert blind >= 5  # the five heads' writes that carry the output


@pytest.mark.parametrize("estimator, blocks", [("atp", 1), ("atp*", 1 + 3)])
def test_forwards_are_the_rows_run(planted, monkeypatch, estimator, blocks):
    m, clean, corrupt, metric = planted
    rows = []
    modules = ["crosspatch.methods.activation_patching", "crosspatch.methods.attribution",
               "crosspatch.methods.shared_prefix", "crosspatch.methods.localize_verify"]
    for name in modules:
        module = importlib.import_module(name)
        real = module.execute

        def counting(module_, adapter, catalog, inputs, *args, _real=real, **kwargs):
            rows.append(inputs["input_ids"].shape[0])
            return _real(module_, adapter, catalog, inputs, *args, **kwargs)

        monkeypatch.setattr(module, "execute", counting)
    loc = localize(m, clean, corrupt, metric, tol=0.05, estimator=estimator)
    n = clean.shape[0]  # AtP's row blocks: the plain one, and with AtP* one per layer dropped
    assert sum(rows) % n == 0
    assert loc.forwards == sum(rows) // n + 2 * blocks  # + the backward through the gradient forward, as two
    cost = loc.metadata["cost"]
    assert cost["attribution"] == 3 * blocks + 1
    assert loc.forwards == cost["attribution"] + cost["baseline_runs"] + cost["patched_sites"]
    assert loc.forwards == sum(r.metadata["forwards"] for r in loc.levels.values()) + cost["attribution"]


def test_start_resid_walks_the_residual_stream(planted):
    m, clean, corrupt, metric = planted
    loc = localize(m, clean, corrupt, metric, normalize=True, tol=0.05, start="resid", levels=["layer", "layer_pos"])
    assert loc.metadata["patterns"]["layer"] == ["resid_pre.*", "resid_post.2"]
    res = loc.sweep("resid_pre.*[pos=*]")
    assert res.dims == ("layer", "pos")
    # the whole residual entering a layer restores the clean run: the gap, on every verified layer
    layer = loc.levels["layer"]
    verified = np.array(layer.metadata["verified"])
    np.testing.assert_allclose(layer.values[verified], 1.0, atol=1e-4)


def test_the_result_reads_as_tables(planted):
    m, clean, corrupt, metric = planted
    loc = localize(m, clean, corrupt, metric, normalize=True, tol=0.05, neurons=True)
    # the default walk: whole heads (``component``) only when asked
    assert isinstance(loc, Localization) and list(loc.levels) == ["layer", "layer_pos", "component_pos", "neuron"]
    assert "verified" in repr(loc) and f"{loc.forwards} forwards" in repr(loc)
    frame = loc.to_pandas()
    assert set(frame.columns) == {"level", "site", "estimate", "value", "verified", "skipped"}
    assert frame["verified"].sum() >= len(loc.verified)
    assert loc["neuron"].values.size == 3 * 8 * 256
    with pytest.raises(KeyError, match="walked"):
        loc["heads"]
    with pytest.raises(KeyError, match="patterns"):
        loc.sweep("head_out.*")
    assert loc.estimates.metadata["variant"] == "atp" and loc.metadata["estimator"] == "atp"


@pytest.mark.parametrize(
    "options, message",
    [({"tol": -0.1}, "tol must be >= 0"), ({"k": 0}, "k must be a positive int"),
     ({"start": "embed"}, "start must be"), ({"estimator": "cdt"}, "estimator must be"), ({"levels": ["heads"]}, "levels must name")],
)
def test_bad_arguments_raise(planted, options, message):
    m, clean, corrupt, metric = planted
    with pytest.raises(ValueError, match=message):
        localize(m, clean, corrupt, metric, **options)


def test_exported():
    assert cp.localize is localize


def _deep_planted():
    """6 layers x 8 heads (d 64), 4 prompts of 20 tokens corrupted at position 4, heads 1.3, 3.6 and 5.1
    planted."""
    return _planted(heads=[(1, 3), (3, 6), (5, 1)], n_layer=6, n_head=8, tokens=20, at=4, seed=1, shift=31)


def test_a_tenth_of_the_sweeps_forwards_on_a_deep_planted_model(monkeypatch):
    """The claim where it must hold: the (component, position) sweep of a 6 x 8 model runs 6 x 9 x 16 sites,
    so AtP* (22 forwards), the clean and corrupt runs and the 12-site anchor are 4 % of it. localize with
    k=5 recalls the sweep's top 5 exactly and spends at most a tenth of its forwards, both counted as the rows
    every engine call receives, divided by the prompts (a backward as two forwards)."""
    m, clean, corrupt, metric = _deep_planted()
    rows = []
    for name in ["crosspatch.methods.activation_patching", "crosspatch.methods.attribution",
                 "crosspatch.methods.shared_prefix", "crosspatch.methods.localize_verify"]:
        module = importlib.import_module(name)

        def counting(module_, adapter, catalog, inputs, *args, _real=module.execute, **kwargs):
            rows.append(inputs["input_ids"].shape[0] * (3 if kwargs.get("grad") else 1))
            return _real(module_, adapter, catalog, inputs, *args, **kwargs)

        monkeypatch.setattr(module, "execute", counting)
    n = clean.shape[0]
    fine = level_patterns("component_pos")
    sweep = cp.activation_patching(m, clean, corrupt, fine, metric, normalize=True, progress=False)
    sweep_forwards, rows[:] = sum(rows) / n, []
    assert sweep_forwards == 2 + sweep.metadata["sites_run"] == 2 + 6 * 9 * 16
    loc = localize(m, clean, corrupt, metric, normalize=True, tol=0.01, k=5)
    assert loc.forwards == sum(rows) / n
    assert loc.metadata["sweep_forwards"] == sweep_forwards  # what localize says the sweep costs, without running it
    assert loc.forwards <= 0.10 * sweep_forwards
    truth = dict(zip(sweep.coords["site"], sweep.values.tolist()))
    top5 = sorted(truth, key=lambda s: -abs(truth[s]))[:5]
    assert set(loc.top(5)["site"]) == set(top5) and set(top5) <= set(loc.verified)
    close([loc.verified[s] for s in top5], [truth[s] for s in top5])


def test_plain_atp_estimates_are_additive_so_a_parents_unexplained_part_is_its_own_error(planted):
    """The default estimator is attribution_patching without GradDrop (a second call gives the same values),
    and it is linear in each site's activation: a parent's estimate is the sum of its children's (the heads'
    writes at a position sum to the attention output there, the positions' MLP writes to the layer's), so a
    verified parent's unexplained part, |exact - sum of the children's estimates|, is AtP's error on it."""
    m, clean, corrupt, metric = planted
    loc = localize(m, clean, corrupt, metric, normalize=True, tol=0.05)
    est = dict(zip(loc.estimates.coords["site"], loc.estimates.values.tolist()))
    sites = list(est)
    again = cp.attribution_patching(m, clean, corrupt, sites, metric, normalize=True)
    np.testing.assert_allclose(again.values, [est[s] for s in sites], rtol=1e-5, atol=1e-7)
    scale = max(abs(v) for v in est.values())
    for layer in range(3):
        for pos in range(3, 8):
            heads = sum(est[f"head_out.{layer}[pos={pos},head={h}]"] for h in range(4))
            assert abs(est[f"attn_out.{layer}[pos={pos}]"] - heads) <= 1e-5 * scale
        mlp = sum(est[f"mlp_out.{layer}[pos={p}]"] for p in range(8))
        assert abs(est[f"mlp_out.{layer}"] - mlp) <= 1e-5 * scale
    star = localize(m, clean, corrupt, metric, normalize=True, tol=0.05, estimator="atp*",
                    levels=["layer", "layer_pos"])
    star_est = dict(zip(star.estimates.coords["site"], star.estimates.values.tolist()))
    gaps = [abs(star_est[f"mlp_out.{layer}"] - sum(star_est[f"mlp_out.{layer}[pos={p}]"] for p in range(8)))
            for layer in range(2)]
    assert max(gaps) > 1e-3 * scale  # GradDrop's scores are not additive (the last layer's equal AtP's)


def test_one_prompt_verification_joins_rows_at_their_block_and_keeps_the_values(monkeypatch):
    """With one prompt a verification round's later sites join its forward at their own block, as the sweep's do;
    the verified values stay activation patching's, with joins and without."""
    m, clean, corrupt, _ = _planted(n_layer=4)
    clean, corrupt = clean[:1], corrupt[:1]
    with torch.no_grad():
        moved = m.module(clean).logits[:, -1] - m.module(corrupt).logits[:, -1]
    metric = cp.metrics.logit_diff(moved.argmax(-1), moved.argmin(-1))
    verify = importlib.import_module("crosspatch.methods.localize_verify")
    joined = []

    def spy(module_, adapter, catalog, inputs, *args, _real=verify.execute, **kwargs):
        resume = kwargs.get("resume")
        if resume is not None and resume.joins:
            joined.append(resume.joined)
        return _real(module_, adapter, catalog, inputs, *args, **kwargs)

    monkeypatch.setattr(verify, "execute", spy)
    loc = localize(m, clean, corrupt, metric, normalize=True, tol=0)  # every site of every level verified
    assert joined and sum(joined) > len(joined)  # rows joined part-way, several a forward
    ap = importlib.import_module("crosspatch.methods.activation_patching")
    for flag in (True, False):
        monkeypatch.setattr(ap, "JOIN_ROWS", flag)
        for pattern, res in loc.sweeps.items():
            exact = cp.activation_patching(m, clean, corrupt, pattern, metric, normalize=True, progress=False)
            close(res.values, exact.values)
            assert np.array(res.metadata["skipped"]).tolist() == exact.skipped.tolist()


@pytest.mark.parametrize("case", ["middle", "first", "left", "right", "noising"])
def test_the_verification_patches_into_atps_own_runs(case, monkeypatch):
    """Where AtP's gradient forward keeps a prefix (the pair shares its first position) the verification patches
    into AtP's base and source runs and makes none of its own; its values stay activation patching's (with
    padding, and noising); a pair differing at position 0 makes its own two runs. Sharing or not, the same
    sites are verified with the same values (to float rounding: a gradient forward may round differently)."""
    from conftest import padded_prompts

    m, _, _, _ = _planted(n_layer=3)
    pad = case if case in ("left", "right") else None
    clean = padded_prompts(3, rows=4, length=8, pad=pad)
    corrupt = {k: v.clone() for k, v in clean.items()}
    at = 0 if case == "first" else 4
    corrupt["input_ids"][:, at] = clean["input_ids"][:, at] % 97 + 2
    with torch.no_grad():
        moved = m.module(**clean).logits[:, -1] - m.module(**corrupt).logits[:, -1]
    metric = cp.metrics.logit_diff(moved.argmax(-1), moved.argmin(-1))
    direction = "noising" if case == "noising" else "denoising"
    verify = importlib.import_module("crosspatch.methods.localize_verify")
    whole = []

    def spy(module_, adapter, catalog, inputs, *args, _real=verify.execute, **kwargs):
        if kwargs.get("resume") is None:
            whole.append(inputs["input_ids"].shape[0])
        return _real(module_, adapter, catalog, inputs, *args, **kwargs)

    monkeypatch.setattr(verify, "execute", spy)
    loc = localize(m, clean, corrupt, metric, normalize=True, tol=0.05, direction=direction)
    shared = at > 0
    assert loc.metadata["cost"]["baseline_runs"] == (0 if shared else 2)
    assert whole == ([] if shared else [4])  # the base run; the source run goes through shared_prefix
    monkeypatch.setattr(verify, "SHARE_RUNS", False)
    own = localize(m, clean, corrupt, metric, normalize=True, tol=0.05, direction=direction)
    assert own.metadata["cost"]["baseline_runs"] == 2
    assert sorted(own.verified) == sorted(loc.verified) and loc.verified
    close([loc.verified[s] for s in sorted(loc.verified)], [own.verified[s] for s in sorted(loc.verified)])
    for pattern, res in loc.sweeps.items():
        exact = cp.activation_patching(m, clean, corrupt, pattern, metric, normalize=True, direction=direction,
                                       progress=False)
        verified = np.array(res.metadata["verified"], dtype=bool)
        close(res.values[verified], exact.values[verified])
        assert np.array(res.metadata["skipped"])[verified].tolist() == exact.skipped[verified].tolist()


def test_the_plot_shows_the_values_and_what_was_patched(planted, tmp_path):
    m, clean, corrupt, metric = planted
    loc = localize(m, clean, corrupt, metric, normalize=True, tol=0.05, k=5)
    fig = loc.plot(title="planted")
    maps = [ax for ax in fig.axes if ax.images]
    assert [ax.get_title() for ax in maps] == [f"{p} (dot: patched)" for p in loc.metadata["patterns"]["layer_pos"]]
    for ax, pattern in zip(maps, loc.metadata["patterns"]["layer_pos"]):
        res = loc.sweep(pattern)
        np.testing.assert_array_equal(ax.images[0].get_array(), res.values)
        patched = np.array(res.metadata["verified"]) & ~np.array(res.metadata["skipped"])
        dots = ax.collections[0].get_offsets()
        assert sorted(map(tuple, np.asarray(dots).astype(int).tolist())) == sorted(
            (int(c), int(r)) for r, c in zip(*np.nonzero(patched)))
    bars = next(ax for ax in fig.axes if ax.get_title().startswith("component_pos: top 5"))
    top = loc.top(5)
    widths = sorted((p.get_width() for p in bars.patches), key=abs, reverse=True)
    np.testing.assert_allclose(widths, top["value"].to_numpy(), rtol=1e-6)
    assert [t.get_text() for t in bars.get_yticklabels()] == list(top["site"])
    fig.savefig(tmp_path / "localize.png")
