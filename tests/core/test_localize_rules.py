"""localize's verification rule in its parts: the rest test of a parent's unverified children (its value is
activation patching's of the group, it clears a parent whose unexplained part is its verified children's
interaction and sends the search down where the rest holds more than its estimates),
the rising threshold (a round verifies first what reaches the threshold the level is heading for, and the
level still stops only when no unverified bound reaches the threshold), and recall of an exhaustive sweep's
top k on planted models with both, against both turned off."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import crosspatch as cp
from crosspatch.adapters.transformers.tiny import tiny_model
from crosspatch.methods import localize as localize_module
from crosspatch.methods.localize import _Group, _group_site, _more_children, _pick, _Unit, _unexplained, localize
from crosspatch.methods.localize_verify import Verifier
from crosspatch.methods.pairs import prepare_pair

from test_localize import close


def _units(parent_value: float, verified: dict[int, float], open_: dict[int, float]):
    """A verified parent ``attn_out.0`` and its children ``attn_out.0[pos=p]``: some verified, some open (with
    these estimates)."""
    parent = _Unit("attn_out.0", "attn_out", "layer", parent_value, [], value=parent_value)
    kids = [_Unit(f"attn_out.0[pos={p}]", "attn_out", "layer_pos", v, ["attn_out.0"], value=v)
            for p, v in verified.items()]
    kids += [_Unit(f"attn_out.0[pos={p}]", "attn_out", "layer_pos", e, ["attn_out.0"]) for p, e in open_.items()]
    units = {u.site: u for u in [parent, *kids]}
    bounds = {u.site: abs(u.estimate) * 1.1 for u in kids}
    return units, kids, bounds


def test_a_rest_test_clears_an_interaction_and_searches_a_real_miss(monkeypatch):
    """The parent's effect exceeds its children's by 0.084, the two verified children's interaction: by the
    parent alone an unverified child could hold it (0.084 + its bound reaches the threshold 0.02). The rest
    test patches the four open children at once; if it comes out as their estimates say, no child is verified;
    if it holds 0.034 more, the search goes on among them, doubling from the parent's verified children, and a
    smaller rest test follows once some are verified."""
    open_ = {2: 0.004, 3: 0.004, 4: 0.004, 5: 0.004}
    units, kids, bounds = _units(1.0, {0: 0.6, 1: 0.3}, open_)
    groups: dict[str, list[_Group]] = {}
    d, members, rest, ran = _unexplained(kids, units, groups)["attn_out.0"]
    assert d == pytest.approx(1.0 - 0.9 - 0.016) and not rest and ran == 2
    more, tests = _more_children(_unexplained(kids, units, groups), 0.02, bounds, [])
    assert more == [] and len(tests) == 1
    parent, group = tests[0]
    assert parent == "attn_out.0" and group.site == "attn_out.0[pos={2,3,4,5}]"
    assert group.members == {f"attn_out.0[pos={p}]" for p in open_}

    # the rest is what its estimates say: explained, nothing verified
    groups["attn_out.0"] = [_Group(group.site, group.members, 0.017)]
    d, members, rest, _ = _unexplained(kids, units, groups)["attn_out.0"]
    assert d == pytest.approx(0.001) and rest and len(members) == 4
    assert _more_children(_unexplained(kids, units, groups), 0.02, bounds, []) == ([], [])
    # without the rest test the parent's interaction sends the search to its children
    with monkeypatch.context() as off:
        off.setattr(localize_module, "REST_TESTS", False)
        more, tests = _more_children(_unexplained(kids, units, {}), 0.02, bounds, [])
        assert len(more) == 2 and tests == []  # as many as the parent has verified

    # the rest holds 0.034 more than its estimates: two children (as many as are patched), then the last two;
    # one rest test a parent, so the search among its members doubles as without
    groups["attn_out.0"] = [_Group(group.site, group.members, 0.05)]
    more, tests = _more_children(_unexplained(kids, units, groups), 0.02, bounds, [])
    assert tests == [] and [u.site for u in more] == ["attn_out.0[pos=2]", "attn_out.0[pos=3]"]
    for u in more:
        u.value = u.estimate
    more, tests = _more_children(_unexplained(kids, units, groups), 0.02, bounds, [])
    assert tests == [] and [u.site for u in more] == ["attn_out.0[pos=4]", "attn_out.0[pos=5]"]
    # a parent none of whose children is patched yet verifies its likeliest child: a rest test would be itself
    fresh, fresh_kids, fresh_bounds = _units(1.0, {}, open_)
    more, tests = _more_children(_unexplained(fresh_kids, fresh, {}), 0.02, fresh_bounds, [])
    assert tests == [] and [u.site for u in more] == ["attn_out.0[pos=2]"]


def test_with_allowances_a_rest_tests_members_erring_the_same_way_send_no_search(monkeypatch):
    """Four unverified children estimated at 0.02 each, with bounds 0.03 (an allowance of 0.01 each); their
    rest test comes out 0.105, 0.025 above their estimates. By default 0.025 plus the likeliest child's bound
    reaches the threshold 0.05 and the search goes on; with ``REST_ALLOWANCE`` it is what three of them can
    hold within their allowances (0.03), no sign of the fourth."""
    units, kids, _ = _units(1.0, {0: 0.6, 1: 0.3}, {p: 0.02 for p in range(2, 6)})
    bounds = {u.site: abs(u.estimate) * 1.5 for u in kids}
    members = frozenset(f"attn_out.0[pos={p}]" for p in range(2, 6))
    groups = {"attn_out.0": [_Group("attn_out.0[pos={2,3,4,5}]", members, 0.105)]}
    more, tests = _more_children(_unexplained(kids, units, groups), 0.05, bounds, [])
    assert len(more) == 2 and tests == []
    monkeypatch.setattr(localize_module, "REST_ALLOWANCE", True)
    assert _more_children(_unexplained(kids, units, groups), 0.05, bounds, []) == ([], [])


def test_a_rest_test_never_makes_a_parent_less_explained(monkeypatch):
    """The parent's effect exceeds its children's by 0.084; its rest test, of four children estimated at 0.004
    each, comes out 0.2, 0.184 above them (many small underestimates adding up). With the threshold at 0.1 the
    parent alone would send no search; the rest test counts where it is below the parent's part, so it does not
    either (``REST_MIN_D``); the rest's part alone would."""
    open_ = {2: 0.004, 3: 0.004, 4: 0.004, 5: 0.004}
    units, kids, bounds = _units(1.0, {0: 0.6, 1: 0.3}, open_)
    members = frozenset(f"attn_out.0[pos={p}]" for p in open_)
    groups = {"attn_out.0": [_Group("attn_out.0[pos={2,3,4,5}]", members, 0.2)]}
    d, _, rest, _ = _unexplained(kids, units, groups)["attn_out.0"]
    assert rest and d == pytest.approx(0.084)
    assert _more_children(_unexplained(kids, units, groups), 0.1, bounds, []) == ([], [])
    monkeypatch.setattr(localize_module, "REST_MIN_D", False)
    assert _unexplained(kids, units, groups)["attn_out.0"][0] == pytest.approx(0.184)
    more, _ = _more_children(_unexplained(kids, units, groups), 0.1, bounds, [])
    assert len(more) == 2


def test_group_sites_select_the_axis_the_children_differ_along():
    heads = [_Unit(f"head_out.3[pos=9,head={h}]", "head_out", "component_pos", 0.0) for h in (6, 1, 4)]
    assert _group_site(heads) == "head_out.3[pos=9,head={1,4,6}]"
    positions = [_Unit(f"head_out.3[pos={p},head=2]", "head_out", "component_pos", 0.0) for p in (12, 9)]
    assert _group_site(positions) == "head_out.3[pos={9,12},head=2]"
    assert _group_site(heads[:1]) is None  # one child is verified as itself
    mixed = [heads[0], _Unit("head_out.3[pos=10,head=1]", "head_out", "component_pos", 0.0)]
    assert _group_site(mixed) is None  # two axes differ: no one site holds them


def test_the_rising_threshold_leaves_what_only_the_current_threshold_reaches_for_later(monkeypatch):
    """Five sites are verified with 0.5, 0.4, 0.3, 0.012 and 0.011; k = 5, so the threshold is 0.011. Three
    candidates reach it: estimates 0.2 and 0.15 (bounds 0.22, 0.165) and 0.011 (bound 0.0121). If the first two
    are what AtP says, the level's 5th largest effect will be 0.15: the round verifies those two, and the third
    waits for the threshold their exact values give."""
    listed = [_Unit(f"mlp_out.0[pos={p}]", "mlp_out", "layer_pos", v, value=v)
              for p, v in enumerate([0.5, 0.4, 0.3, 0.012, 0.011])]
    listed += [_Unit(f"mlp_out.0[pos={p}]", "mlp_out", "layer_pos", e) for p, e in [(5, 0.2), (6, 0.15), (7, 0.011)]]
    bounds = {u.site: abs(u.estimate) * 1.1 for u in listed}
    todo, tests = _pick(listed, ["mlp_out"], bounds, 0.011, 5, {})
    assert [u.site for u in todo] == ["mlp_out.0[pos=5]", "mlp_out.0[pos=6]"] and tests == []
    monkeypatch.setattr(localize_module, "RISING", False)
    todo, _ = _pick(listed, ["mlp_out"], bounds, 0.011, 5, {})
    assert len(todo) == 3  # every candidate at once


def _saturated_planted(seed: int):
    """A 6 x 8 GPT-2 (d 128) with three heads' output projections x 8 and their queries x 30 (their attention
    saturates, so AtP underestimates what acts through it), 8 prompts of 24 tokens corrupted at position 8: the
    benchmark's saturated planted model."""
    model = tiny_model("gpt2", seed=seed, n_layer=6, n_head=8, n_embd=128, n_inner=512, vocab_size=512,
                       n_positions=128)
    rng = np.random.default_rng(seed)
    planted = [(int(layer), int(rng.integers(8))) for layer in sorted(rng.choice(6, 3, replace=False).tolist())]
    with torch.no_grad():
        for layer, head in planted:
            attn = model.transformer.h[layer].attn
            attn.c_proj.weight[head * 16 : (head + 1) * 16] *= 8.0
            attn.c_attn.weight[:, head * 16 : (head + 1) * 16] *= 30.0
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, 512, (8, 24), generator=g)
    corrupt = clean.clone()
    corrupt[:, 8] = (clean[:, 8] + torch.randint(1, 512, (8,), generator=g)) % 512
    with torch.no_grad():
        moved = model(clean).logits[:, -1] - model(corrupt).logits[:, -1]
    return cp.wrap(model), clean, corrupt, cp.metrics.logit_diff(moved.argmax(-1), moved.argmin(-1))


@pytest.fixture(scope="module")
def saturated():
    m, clean, corrupt, metric = _saturated_planted(3)
    fine = localize_module.level_patterns("component_pos")
    sweep = cp.activation_patching(m, clean, corrupt, fine, metric, normalize=True, progress=False)
    return m, clean, corrupt, metric, sweep


@pytest.mark.parametrize("k", [5, 20])
def test_recall_of_the_sweeps_top_k_with_fewer_forwards(saturated, monkeypatch, k):
    """On a saturated planted model the sweep's top k are all verified, with activation patching's values, and
    ranked first, with the rising threshold and rest tests as without them; at k = 20 they save forwards."""
    m, clean, corrupt, metric, sweep = saturated
    truth = dict(zip(sweep.coords["site"], sweep.values.tolist()))
    top = sorted(truth, key=lambda s: -abs(truth[s]))[:k]
    spent = {}
    for on in (False, True):
        monkeypatch.setattr(localize_module, "RISING", on)
        monkeypatch.setattr(localize_module, "REST_TESTS", on)
        loc = localize(m, clean, corrupt, metric, normalize=True, tol=0.01, k=k)
        assert set(loc.top(k)["site"]) == set(top) and set(top) <= set(loc.verified)
        close([loc.verified[s] for s in top], [truth[s] for s in top])
        for name, res in loc.levels.items():  # the stop: no unverified site's bound reaches the threshold
            assert res.metadata["max_unverified_bound"] < res.metadata["threshold"] or name == "layer"
        spent[on] = loc.forwards
        if on and k == 20:
            tests = loc.metadata["rest_tests"]
            assert tests  # this model's coarse parents leave interactions that rest tests clear
            exact = cp.activation_patching(m, clean, corrupt, list(tests), metric, normalize=True, progress=False)
            close(exact.values, list(tests.values()))  # a rest test's value is activation patching's of the group
    if k == 20:  # at k = 5 a rest test can cost a forward more than it saves (39 against 38 here)
        assert spent[True] < spent[False]


def test_unchanged_sites_are_the_sweeps_skipped_ones(saturated):
    m, clean, corrupt, metric, sweep = saturated
    sites = list(sweep.coords["site"])
    verifier = Verifier(prepare_pair(m, clean, corrupt, metric, "denoising"), sites, direction="denoising",
                        normalize=True, batch_size=None, reuse_prefix=True)
    unchanged = verifier.unchanged(sites)
    assert unchanged == sweep.skipped.reshape(-1).tolist() and any(unchanged) and not all(unchanged)
    assert verifier.runs(sites) == sweep.metadata["sites_run"]
