"""head_roles on a model built to have a primary, a negative and a backup head: every value against the closed form."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import crosspatch as cp
from crosspatch.methods.head_roles import head_roles, plot_head_roles, roles_of
from crosspatch.zoo.role_toys import BACKUP, BETA, INERT, NEGATIVE, NU, PRIMARY, closed_form_roles, role_toy


@pytest.fixture(scope="module")
def toy():
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 50, (5, 4), generator=g)
    corrupt = torch.randint(0, 50, (5, 4), generator=g)
    corrupt[:, -1] = (clean[:, -1] + 1 + torch.randint(0, 48, (5,), generator=g)) % 50  # never equal at the read position
    return role_toy(), clean, corrupt, cp.metrics.logit_diff(0, 1)


def _column(result, measure):
    return dict(zip(result.coords["head"], result.values[:, list(result.coords["measure"]).index(measure)]))


def test_values_equal_the_closed_form(toy):
    m, clean, corrupt, metric = toy
    res = head_roles(m, clean, corrupt, metric, top_k=1, progress=False)
    truth = closed_form_roles()
    assert res.metadata["primaries"] == [PRIMARY] and res.metadata["ablated_sets"] == ["0.0"]
    total, direct = _column(res, "total"), _column(res, "direct")
    after, comp = _column(res, "direct | without 0.0"), _column(res, "compensation | without 0.0")
    for head, want in truth.items():
        assert total[head] == pytest.approx(want["total"], abs=1e-12)
        assert direct[head] == pytest.approx(want["direct"], abs=1e-12)
        if want["compensation"] is None:
            assert np.isnan(comp[head]) and np.isnan(after[head])
        else:
            assert comp[head] == pytest.approx(want["compensation"], abs=1e-12)
    gap = (1 - NU) * ((clean[:, -1] - corrupt[:, -1]).double() / 50).mean()
    assert res.metadata["gap"] == pytest.approx(float(gap), rel=1e-12)


@pytest.mark.parametrize("threshold", [0.01, 0.1, 0.2, 0.32])
def test_roles_are_recovered_at_every_threshold_the_construction_allows(toy, threshold):
    """Negative needs threshold < NU / (1 - NU) = 1/3, backup < BETA / (1 - NU) = 2/3: any such threshold works."""
    m, clean, corrupt, metric = toy
    res = head_roles(m, clean, corrupt, metric, top_k=1, threshold=threshold, progress=False)
    assert roles_of(res, "primary") == [PRIMARY]
    assert roles_of(res, "negative") == [NEGATIVE]
    assert roles_of(res, "backup") == [BACKUP]  # not N: its direct effect only rises back to 0
    assert res.metadata["backup_for"] == {BACKUP: ["0.0"]}
    assert res.metadata["roles"][INERT] == []


def test_beyond_the_constructed_effects_nothing_is_found(toy):
    m, clean, corrupt, metric = toy
    res = head_roles(m, clean, corrupt, metric, top_k=1, threshold=BETA / (1 - NU) + 0.01, progress=False)
    assert roles_of(res, "negative") == [] and roles_of(res, "backup") == []


def test_given_primaries_and_joint_ablation(toy):
    """Ablating the inert head with P changes nothing about P's ablation; ablating it alone changes nothing at all."""
    m, clean, corrupt, metric = toy
    res = head_roles(m, clean, corrupt, metric, primaries=["0.0", "head_out.0[head=1]"], progress=False)
    assert res.metadata["ablated_sets"] == ["0.0", "0.1", "0.0 + 0.1"]
    alone, joint = _column(res, "compensation | without 0.0"), _column(res, "compensation | without 0.0 + 0.1")
    inert = _column(res, "compensation | without 0.1")
    for head in (NEGATIVE, BACKUP):
        assert joint[head] == pytest.approx(alone[head], abs=1e-12)
        assert inert[head] == pytest.approx(0.0, abs=1e-12)
    assert res.metadata["backup_for"] == {BACKUP: ["0.0", "0.0 + 0.1"]}


def test_bad_arguments_are_named(toy):
    m, clean, corrupt, metric = toy
    with pytest.raises(ValueError, match="'3.0' is not a head or MLP"):
        head_roles(m, clean, corrupt, metric, primaries=["3.0"], progress=False)
    with pytest.raises(ValueError, match="threshold"):
        head_roles(m, clean, corrupt, metric, threshold=-1, progress=False)
    with pytest.raises(ValueError, match="gap"):
        head_roles(m, clean, clean, metric, progress=False)


def test_plot(toy, tmp_path):
    m, clean, corrupt, metric = toy
    res = head_roles(m, clean, corrupt, metric, top_k=1, progress=False)
    fig = plot_head_roles(res)
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert labels == ["0.0\nprimary", "0.1", "1.0\nnegative", "1.1\nbackup"]
    fig.savefig(tmp_path / "roles.png")
    assert res.save(tmp_path / "roles").exists()


def test_plot_of_many_heads_is_layer_by_head_maps(toy, tmp_path, monkeypatch):
    """Beyond MAX_BARS heads: one layer x head map per measure, each cell the head's value, roles as initials."""
    import crosspatch.methods.head_roles as hr

    m, clean, corrupt, metric = toy
    res = head_roles(m, clean, corrupt, metric, top_k=1, progress=False)
    monkeypatch.setattr(hr, "MAX_BARS", 2)
    fig = plot_head_roles(res)
    maps = [ax for ax in fig.axes if ax.images]
    assert [ax.get_title() for ax in maps] == ["total effect", "direct effect", "direct effect, 0.0 ablated"]
    for ax, measure in zip(maps, ["total", "direct", "direct | without 0.0"]):
        want = _column(res, measure)
        grid = np.ma.filled(ax.images[0].get_array(), np.nan)
        for head, value in want.items():
            site = cp.Site.parse(head)
            np.testing.assert_equal(grid[site.layer, site.selection["head"]], value)  # NaN (the ablated primary) too
        marks = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in ax.texts}
        assert marks == {(0, 0): "P", (1, 0): "N", (1, 1): "B"}
    fig.savefig(tmp_path / "roles.png")


def test_an_mlp_as_primary(toy):
    """The toy's MLPs write nothing: ablating one leaves every head's direct effect as it was."""
    m, clean, corrupt, metric = toy
    res = head_roles(m, clean, corrupt, metric, primaries=["mlp_out.0"], progress=False)
    assert res.metadata["ablated_sets"] == ["mlp_out.0"] and roles_of(res, "primary") == []
    np.testing.assert_allclose(res.values[:, 3], 0.0, atol=1e-12)
    np.testing.assert_allclose(res.values[:, 2], res.values[:, 1], atol=1e-12)
