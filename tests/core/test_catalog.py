"""The catalog: resolving sites against a model, expanding sweeps, and the real tiny GPT-2's families."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import crosspatch as cp
from crosspatch.sites.catalog import Axis, Catalog, SiteFamily, Sweep
from crosspatch.sites.site import ANY, Site, SiteError, Span


@pytest.fixture
def cat(toy) -> Catalog:
    return toy.sites()


def _plain_catalog() -> Catalog:
    """A catalog built by hand, with a dotted family and a family with three named axes."""
    return Catalog(
        [
            SiteFamily("latent.z", (Axis("dim", 8),), reach=None),
            SiteFamily("vision.head_out", (Axis("pos"), Axis("head", 3), Axis("dim", 2)), reach=None, layers=4),
            SiteFamily("attn_pattern", (Axis("head", 2), Axis("pos"), Axis("key_pos")), reach=None, layers=3),
        ],
        "Plain",
    )


# ---------------------------------------------------------------- the toy catalog itself


def test_toy_catalog_layout(cat):
    assert list(cat.families) == ["hidden_in", "hidden", "out"]
    assert len(cat) == 3
    assert "hidden" in cat and "resid_pre" not in cat
    assert [f.name for f in cat] == ["hidden_in", "hidden", "out"]
    assert cat.order("hidden_in") < cat.order("hidden") < cat.order("out")
    hidden = cat.family("hidden")
    assert hidden.layers == 2
    assert hidden.axis_names == ("pos", "dim")
    assert hidden.axis("dim").size == 4 and hidden.axis("pos").size is None
    assert cat.family("out").layers is None
    with pytest.raises(KeyError):
        hidden.axis("head")


def test_duplicate_family_is_rejected():
    fam = SiteFamily("a", (Axis("dim", 2),), reach=None)
    with pytest.raises(ValueError, match="'a' is listed twice in the catalog of M"):
        Catalog([fam, fam], "M")


def test_repr_lists_every_family(cat):
    text = repr(cat)
    lines = text.splitlines()
    assert lines[0] == "Catalog of ToyNet (3 site families)"
    rows = {line.split()[0]: line.split() for line in lines[2:]}
    assert set(rows) == {"hidden_in", "hidden", "out"}
    assert rows["hidden"][1:] == ["2", "pos=?,", "dim=4"]
    assert rows["out"][1:] == ["-", "pos=?,", "class=3"]


# ---------------------------------------------------------------- resolve: errors name what exists


def test_unknown_family_lists_families_and_suggests(cat):
    with pytest.raises(SiteError) as info:
        cat.resolve("hiden.1")
    message = str(info.value)
    assert "ToyNet has no site family 'hiden'" in message
    assert "Did you mean 'hidden'?" in message
    assert "Families: hidden_in, hidden, out" in message


def test_unknown_family_without_a_close_match_has_no_suggestion(cat):
    with pytest.raises(SiteError) as info:
        cat.resolve("zzzz.0")
    message = str(info.value)
    assert "Did you mean" not in message
    assert "Families: hidden_in, hidden, out" in message


def test_unknown_dotted_family_suggests_the_dotted_name():
    with pytest.raises(SiteError, match=r"Did you mean 'vision.head_out'\?"):
        _plain_catalog().resolve("vision.head_ot.1")


@pytest.mark.parametrize("text", ["hidden.2", "hidden.-3", "hidden.100"])
def test_layer_out_of_range_names_the_range(cat, text):
    layer = text.split(".")[1]
    with pytest.raises(SiteError, match=rf"layer {layer} is out of range 0\.\.1 for 'hidden'"):
        cat.resolve(text)


def test_missing_layer_for_layered_family(cat):
    with pytest.raises(SiteError) as info:
        cat.resolve("hidden[pos=1]")
    message = str(info.value)
    assert "has layers 0..1" in message
    assert "hidden.<layer>" in message and "hidden.*" in message


@pytest.mark.parametrize("text", ["out.0", "out.*", "out.-1[pos=1]"])
def test_layer_given_to_layerless_family(cat, text):
    with pytest.raises(SiteError, match="family 'out' has no layers; write 'out'"):
        cat.resolve(text)


def test_unknown_axis_lists_axes(cat):
    with pytest.raises(SiteError, match="family 'hidden' has no axis 'head'; its axes are pos, dim"):
        cat.resolve("hidden.1[head=1]")
    with pytest.raises(SiteError, match="its axes are pos, class"):
        cat.resolve("out[dim=0]")


@pytest.mark.parametrize(
    "text, bad",
    [
        ("hidden.1[dim=4]", 4),
        ("hidden.1[dim=-5]", -5),
        ("hidden.0[dim={0,9}]", 9),
        ("out[class=3]", 3),
    ],
)
def test_index_out_of_range_for_known_size(cat, text, bad):
    with pytest.raises(SiteError) as info:
        cat.resolve(text)
    message = str(info.value)
    assert f"index {bad} is out of range" in message
    assert "of size" in message
    assert text in message  # the error quotes the site


def test_input_sized_axis_is_checked_only_with_sizes(cat):
    assert cat.resolve("hidden.0[pos=9]") == Site.parse("hidden.0[pos=9]")
    with pytest.raises(SiteError, match="index 9 is out of range for axis 'pos' of size 3"):
        cat.resolve("hidden.0[pos=9]", {"pos": 3})
    # a fixed size wins over a size passed in
    with pytest.raises(SiteError, match="of size 4"):
        cat.resolve("hidden.0[dim=5]", {"dim": 10})


def test_resolve_errors_are_site_errors_for_bad_grammar(cat):
    with pytest.raises(SiteError, match="at character"):
        cat.resolve("hidden.1[dim=")


# ---------------------------------------------------------------- resolve: normalisation


@pytest.mark.parametrize(
    "text, expected",
    [
        ("hidden.-1", "hidden.1"),
        ("hidden.-2", "hidden.0"),
        ("hidden.1", "hidden.1"),
        ("hidden.-1[dim=-1]", "hidden.1[dim=3]"),
        ("hidden.0[dim=-4]", "hidden.0[dim=0]"),
        ("hidden.0[dim={-1,0}]", "hidden.0[dim={0,3}]"),
        ("hidden.0[dim={-1,3}]", "hidden.0[dim={3}]"),  # -1 and 3 are the same index
        ("out[class=-1]", "out[class=2]"),
        ("hidden.*[dim=*]", "hidden.*[dim=*]"),
        ("hidden.0[pos=2:5]", "hidden.0[pos=2:5]"),
        ("hidden.0[pos=-1]", "hidden.0[pos=-1]"),  # unknown size: left alone
    ],
)
def test_resolve_normalises_negative_layers_and_indices(cat, text, expected):
    assert cat.resolve(text) == Site.parse(expected)
    assert str(cat.resolve(text)) == expected


def test_resolve_checks_negative_positions_given_sizes_and_keeps_them(cat):
    # The end a position counts from is the inputs' (and with padding, each row's): the engine applies it.
    assert cat.resolve("hidden.0[pos=-1]", {"pos": 5}) == Site.parse("hidden.0[pos=-1]")
    assert cat.resolve("hidden.0[pos=-3:]", {"pos": 5}) == Site.parse("hidden.0[pos=-3:]")
    with pytest.raises(SiteError, match="index -6 is out of range for axis 'pos' of size 5"):
        cat.resolve("hidden.0[pos=-6]", {"pos": 5})
    assert cat.resolve("hidden.0[dim=-1]", {"pos": 5}) == Site.parse("hidden.0[dim=3]")  # not a position


@pytest.mark.parametrize("text", ["hidden.0[pos=100:200]", "hidden.0[pos=5:2]", "hidden.0[pos=8:]",
                                  "hidden.0[pos=-9:]", "hidden.0[pos=2:9]", "hidden.0[pos=-4:0]"])
def test_ranges_outside_the_input_or_empty_are_refused_not_clipped(cat, text):
    with pytest.raises(SiteError, match=r"axis 'pos' of size 8 \(the inputs' length\)") as info:
        cat.resolve(text, {"pos": 8})
    assert text in str(info.value)


def test_last_is_a_position_selector(cat):
    assert cat.resolve("hidden.0[pos=last]", {"pos": 5}) == Site.parse("hidden.0[pos=last]")
    assert cat.resolve(Site.make("hidden", 0, pos="last")).selection["pos"] == "last"
    with pytest.raises(SiteError, match="for a position axis .*not 'dim'"):
        cat.resolve("hidden.0[dim=last]")


def test_resolve_puts_selections_in_the_family_axis_order(cat):
    site = Site.make("hidden", -1, dim=-1, pos=2)
    resolved = cat.resolve(site)
    assert resolved == Site("hidden", 1, (("pos", 2), ("dim", 3)))
    assert resolved == cat.resolve("hidden.1[pos=2,dim=3]")


def test_resolve_rejects_non_index_selectors(cat):
    with pytest.raises(SiteError, match="a selection is an int"):
        cat.resolve(Site("hidden", 0, (("dim", True),)))


def test_resolve_dotted_family():
    plain = _plain_catalog()
    assert plain.resolve("latent.z[dim=-1]") == Site("latent.z", None, (("dim", 7),))
    assert plain.resolve("vision.head_out.-1[head=*]") == Site("vision.head_out", 3, (("head", ANY),))
    with pytest.raises(SiteError, match="has layers 0..3"):
        plain.resolve("vision.head_out")


# ---------------------------------------------------------------- expand


def test_expand_layers_and_positions(cat):
    sweep = cat.expand("hidden.*[pos=*]", sizes={"pos": 3})
    assert isinstance(sweep, Sweep)
    assert sweep.dims == ("layer", "pos")
    assert sweep.coords == {"layer": [0, 1], "pos": [0, 1, 2]}
    assert sweep.shape == (2, 3)
    assert len(sweep) == 6
    expected = [Site("hidden", layer, (("pos", p),)) for layer, p in itertools.product(range(2), range(3))]
    assert list(sweep.sites) == expected
    assert not any(s.is_pattern for s in sweep.sites)


def test_expand_one_axis(cat):
    sweep = cat.expand("hidden.1[dim=*]")
    assert sweep.dims == ("dim",)
    assert sweep.coords == {"dim": [0, 1, 2, 3]}
    assert sweep.shape == (4,)
    assert [str(s) for s in sweep.sites] == [f"hidden.1[dim={d}]" for d in range(4)]


def test_expand_layers_only(cat):
    sweep = cat.expand("hidden.*")
    assert sweep.dims == ("layer",)
    assert [str(s) for s in sweep.sites] == ["hidden.0", "hidden.1"]


def test_expand_keeps_fixed_selections(cat):
    sweep = cat.expand("hidden.*[pos=2:4,dim=*]")
    assert sweep.dims == ("layer", "dim")
    assert sweep.shape == (2, 4)
    assert all(s.selection["pos"] == Span(2, 4) for s in sweep.sites)
    assert str(sweep.sites[5]) == "hidden.1[pos=2:4,dim=1]"


def test_expand_concrete_site_is_a_single_site_with_no_dims(cat):
    sweep = cat.expand("hidden.-1[pos=1]")
    assert sweep.dims == () and sweep.coords == {} and sweep.shape == ()
    assert sweep.sites == (Site.parse("hidden.1[pos=1]"),)


def test_expand_normalises_like_resolve(cat):
    sweep = cat.expand("hidden.-1[dim=*,pos=-1]", sizes={"pos": 4})
    assert [str(s) for s in sweep.sites] == [f"hidden.1[pos=-1,dim={d}]" for d in range(4)]


@pytest.mark.parametrize("patterns, words", [
    ({"hidden.0", "hidden.1"}, "got set"),
    ([["hidden.0"], "hidden.1"], "item 0 is a list"),
    (5, "got int"),
    ({"hidden.0": 1}, "got dict"),
])
def test_expand_refuses_unordered_or_nested_patterns(cat, patterns, words):
    with pytest.raises(SiteError, match="a site string, a Site, or a list or tuple of them") as info:
        cat.expand(patterns)
    assert words in str(info.value)


def test_expand_reads_a_generator_once(cat):
    sweep = cat.expand(s for s in ["hidden.0", "hidden.1"])
    assert sweep.coords == {"site": ["hidden.0", "hidden.1"]}


def test_expand_list_gives_site_dim(cat):
    sweep = cat.expand(["hidden.1[dim=*]", "out[pos=1]", Site.make("hidden_in", 0)])
    assert sweep.dims == ("site",)
    expected = [f"hidden.1[dim={d}]" for d in range(4)] + ["out[pos=1]", "hidden_in.0"]
    assert sweep.coords == {"site": expected}
    assert [str(s) for s in sweep.sites] == expected
    assert sweep.shape == (6,)


def test_expand_list_with_one_pattern_still_gives_site_dim(cat):
    sweep = cat.expand(["hidden.*"])
    assert sweep.dims == ("site",)
    assert sweep.coords == {"site": ["hidden.0", "hidden.1"]}


def test_expand_accepts_a_site(cat):
    assert cat.expand(Site.make("hidden", "*")).dims == ("layer",)


def test_expand_position_wildcard_needs_sizes(cat):
    with pytest.raises(SiteError) as info:
        cat.expand("hidden.*[pos=*]")
    message = str(info.value)
    assert "axis 'pos' depends on the input" in message
    assert "sizes={'pos': n}" in message
    with pytest.raises(SiteError, match="axis 'pos' depends on the input"):
        cat.expand(["hidden.0", "hidden.1[pos=*]"])


def test_expand_checks_the_pattern(cat):
    with pytest.raises(SiteError, match="no site family"):
        cat.expand("hiden.*")
    with pytest.raises(SiteError, match="index 7 is out of range"):
        cat.expand("hidden.*[dim=7]")


def _product_sites(family, layers, axes_in_family_order, fixed_sel_order, ranges):
    """Sites in layer-major, then family-axis order, each with its selections in the pattern's order."""
    out = []
    for combo in itertools.product(layers, *ranges):
        layer, values = combo[0], dict(zip(axes_in_family_order, combo[1:]))
        out.append(Site(family, layer, tuple((a, values[a]) for a in fixed_sel_order)))
    return out


def test_expand_order_is_layer_major_then_family_axis_order():
    plain = _plain_catalog()
    # the pattern names axes in a different order from the family (pos, head, dim)
    sweep = plain.expand("vision.head_out.*[dim=*,head=*,pos=*]", sizes={"pos": 2})
    assert sweep.dims == ("layer", "pos", "head", "dim")
    assert sweep.shape == (4, 2, 3, 2)
    expected = _product_sites(
        "vision.head_out", range(4), ("pos", "head", "dim"), ("pos", "head", "dim"), [range(2), range(3), range(2)]
    )
    assert list(sweep.sites) == expected


def test_expand_values_reshape_lines_up_with_sites():
    plain = _plain_catalog()
    sweep = plain.expand("attn_pattern.*[pos=*,head=*]", sizes={"pos": 5})
    assert sweep.dims == ("layer", "head", "pos")
    # one value per site, computed from the site itself, reshaped like a result would be
    values = np.array([100 * s.layer + 10 * s.selection["head"] + s.selection["pos"] for s in sweep.sites])
    grid = values.reshape(sweep.shape)
    for idx in itertools.product(*(range(n) for n in sweep.shape)):
        coords = {d: sweep.coords[d][i] for d, i in zip(sweep.dims, idx)}
        assert grid[idx] == 100 * coords["layer"] + 10 * coords["head"] + coords["pos"]
    for i, (layer, head, pos) in enumerate(itertools.product(range(3), range(2), range(5))):
        assert sweep.sites[i] == Site("attn_pattern", layer, (("head", head), ("pos", pos)))


def test_expand_toy_reshape_lines_up(cat):
    sweep = cat.expand("hidden.*[dim=*,pos=*]", {"pos": 3})
    assert sweep.dims == ("layer", "pos", "dim")
    for i, (layer, pos, d) in enumerate(itertools.product(range(2), range(3), range(4))):
        assert sweep.sites[i] == Site("hidden", layer, (("pos", pos), ("dim", d)))


# ---------------------------------------------------------------- the real tiny GPT-2


GPT2_FAMILIES = [
    "embed", "resid_pre", "head_in", "attn_pattern", "head_z", "head_out", "attn_out", "resid_mid", "mlp_in", "mlp_act",
    "mlp_out", "resid_post", "logits_in", "logits",
]


def test_gpt2_catalog(gpt2):
    model = cp.wrap(gpt2)
    catalog = model.sites()
    assert catalog is model.catalog
    assert list(catalog.families) == GPT2_FAMILIES
    assert catalog.model_name == "GPT2LMHeadModel"
    unlayered = ["embed", "logits_in", "logits"]
    for name in unlayered:
        assert catalog.family(name).layers is None
    for name in set(GPT2_FAMILIES) - set(unlayered):
        assert catalog.family(name).layers == 2, name
    sizes = {f.name: {a.name: a.size for a in f.axes} for f in catalog}
    dim = {"pos": None, "dim": 64}
    assert sizes["embed"] == dim
    for name in ["resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post"]:
        assert sizes[name] == dim, name
    assert catalog.family("attn_pattern").axis_names == ("head", "pos", "key_pos")
    assert sizes["attn_pattern"] == {"head": 4, "pos": None, "key_pos": None}
    assert catalog.family("head_out").axis_names == ("pos", "head", "dim")
    assert sizes["head_out"] == {"pos": None, "head": 4, "dim": 64}
    assert sizes["mlp_act"] == {"pos": None, "neuron": 256}
    assert sizes["logits"] == {"pos": None, "vocab": 100}
    assert sizes["head_in"] == {"pos": None, "qkv": 3, "head": 4, "dim": 64}
    assert sizes["mlp_in"] == sizes["logits_in"] == dim


def test_gpt2_repr_lists_every_family(gpt2):
    text = repr(cp.wrap(gpt2).sites())
    assert f"({len(GPT2_FAMILIES)} site families)" in text
    for name in GPT2_FAMILIES:
        assert any(line.split() and line.split()[0] == name for line in text.splitlines()), name
    assert "neuron=256" in text and "vocab=100" in text and "head=4" in text


def test_gpt2_resolve_and_expand(gpt2):
    catalog = cp.wrap(gpt2).sites()
    assert catalog.resolve("head_out.-1[head=-1]") == Site.parse("head_out.1[head=3]")
    with pytest.raises(SiteError, match="out of range for axis 'neuron' of size 256"):
        catalog.resolve("mlp_act.0[neuron=256]")
    with pytest.raises(SiteError, match="out of range 0..1"):
        catalog.resolve("resid_pre.2")
    with pytest.raises(SiteError, match="Did you mean 'resid_pre'"):
        catalog.resolve("resid_pr.0")
    sweep = catalog.expand("head_out.*[head=*]")
    assert sweep.dims == ("layer", "head") and sweep.shape == (2, 4)
    assert [str(s) for s in sweep.sites[:5]] == [
        "head_out.0[head=0]", "head_out.0[head=1]", "head_out.0[head=2]", "head_out.0[head=3]", "head_out.1[head=0]",
    ]
    assert catalog.expand("logits[vocab=*]").shape == (100,)
