"""Site grammar: parsing, printing, building and comparing sites, and the errors for bad strings."""

from __future__ import annotations

import random
import re

import pytest

from crosspatch.sites.site import ANY, Site, SiteError, Span, site_key

# ---------------------------------------------------------------- canonical strings round-trip

CANONICAL = {
    "head_out.5[head=2]": Site("head_out", 5, (("head", 2),)),
    "resid_pre.*[pos=7]": Site("resid_pre", ANY, (("pos", 7),)),
    "head_out.*[head=*]": Site("head_out", ANY, (("head", ANY),)),
    "latent.z[dim=4]": Site("latent.z", None, (("dim", 4),)),
    "vision.head_out.3[head=*]": Site("vision.head_out", 3, (("head", ANY),)),
    "encoder.block.2[channel=5]": Site("encoder.block", 2, (("channel", 5),)),
    "resid_post.3[pos=2:5]": Site("resid_post", 3, (("pos", Span(2, 5)),)),
    "x.1[pos=:5]": Site("x", 1, (("pos", Span(None, 5)),)),
    "x.1[pos=3:]": Site("x", 1, (("pos", Span(3, None)),)),
    "x.1[pos=:]": Site("x", 1, (("pos", Span(None, None)),)),
    "x.1[pos=-3:-1]": Site("x", 1, (("pos", Span(-3, -1)),)),
    "x.1[pos=-1]": Site("x", 1, (("pos", -1),)),
    "x.-1": Site("x", -1),
    "head_out.1[head={0,2}]": Site("head_out", 1, (("head", (0, 2)),)),
    "head_out.1[head={-1,3}]": Site("head_out", 1, (("head", (-1, 3)),)),
    "head_out.1[head={4}]": Site("head_out", 1, (("head", (4,)),)),
    "attn_pattern.0[head=1,pos=3]": Site("attn_pattern", 0, (("head", 1), ("pos", 3))),
    "attn_pattern.*[head=*,pos=2:4,key_pos={0,1}]": Site(
        "attn_pattern", ANY, (("head", ANY), ("pos", Span(2, 4)), ("key_pos", (0, 1)))
    ),
    "resid_pre.0": Site("resid_pre", 0),
    "resid_pre.*": Site("resid_pre", ANY),
    "logits": Site("logits"),
    "logits[pos=-1]": Site("logits", None, (("pos", -1),)),
    "a.b.c.d.12": Site("a.b.c.d", 12),
    "_private.x_1.0": Site("_private.x_1", 0),
    "resid_post.1[pos=last]": Site("resid_post", 1, (("pos", "last"),)),
    "attn_pattern.0[head=1,pos=last,key_pos=last]": Site(
        "attn_pattern", 0, (("head", 1), ("pos", "last"), ("key_pos", "last"))
    ),
}


@pytest.mark.parametrize("text", list(CANONICAL))
def test_parse_gives_expected_site(text):
    assert Site.parse(text) == CANONICAL[text]


@pytest.mark.parametrize("text", list(CANONICAL))
def test_canonical_strings_round_trip(text):
    site = Site.parse(text)
    assert str(site) == text
    assert Site.parse(str(site)) == site
    assert str(CANONICAL[text]) == text


def test_parse_field_types():
    site = Site.parse("head_out.5[head=2]")
    assert site.layer == 5 and isinstance(site.layer, int)
    assert isinstance(site.selection["head"], int)
    assert Site.parse("resid_pre.*").layer == "*"
    assert Site.parse("x.1[pos=-1]").selection["pos"] == -1
    span = Site.parse("x.1[pos=:5]").selection["pos"]
    assert isinstance(span, Span) and span.start is None and span.stop == 5


@pytest.mark.parametrize(
    "text, family, layer",
    [
        ("latent.z", "latent.z", None),
        ("latent.z[dim=4]", "latent.z", None),
        ("vision.head_out.3", "vision.head_out", 3),
        ("vision.head_out.*", "vision.head_out", ANY),
        ("encoder.block.2[channel=5]", "encoder.block", 2),
        ("encoder.block.-2", "encoder.block", -2),
        ("a.b1.c", "a.b1.c", None),  # a part with digits after its first letter is a name, not a layer
        ("resid_pre.10", "resid_pre", 10),
    ],
)
def test_dotted_family_names_and_layer_detection(text, family, layer):
    site = Site.parse(text)
    assert (site.family, site.layer) == (family, layer)


@pytest.mark.parametrize(
    "messy, canonical",
    [
        ("head_out.1[head={2,0}]", "head_out.1[head={0,2}]"),  # sets are sorted
        ("head_out.1[head={2,0,2,2}]", "head_out.1[head={0,2}]"),  # and deduplicated
        ("resid_pre.007", "resid_pre.7"),
        ("x.1[pos=-0]", "x.1[pos=0]"),
    ],
)
def test_non_canonical_strings_normalise(messy, canonical):
    assert str(Site.parse(messy)) == canonical
    assert Site.parse(messy) == Site.parse(canonical)


def test_parse_passes_sites_through_and_rejects_other_types():
    site = Site("x", 1)
    assert Site.parse(site) is site
    with pytest.raises(SiteError, match="int"):
        Site.parse(3)
    with pytest.raises(SiteError, match="NoneType"):
        Site.parse(None)


# ---------------------------------------------------------------- make, key, is_pattern, with_


def test_make_with_ints_and_wildcards():
    assert Site.make("head_out", 5, head=2) == Site.parse("head_out.5[head=2]")
    assert Site.make("head_out", "*", head="*") == Site.parse("head_out.*[head=*]")
    assert Site.make("latent.z", dim=4) == Site.parse("latent.z[dim=4]")
    assert Site.make("logits") == Site.parse("logits")


def test_make_with_slices():
    assert Site.make("resid_post", 3, pos=slice(2, 5)) == Site.parse("resid_post.3[pos=2:5]")
    assert Site.make("x", 1, pos=slice(None, 5)) == Site.parse("x.1[pos=:5]")
    assert Site.make("x", 1, pos=slice(-2, None)) == Site.parse("x.1[pos=-2:]")
    assert Site.make("x", 1, pos=slice(1, 4, 1)) == Site.parse("x.1[pos=1:4]")
    assert str(Site.make("x", 1, pos=slice(2, 5))) == "x.1[pos=2:5]"


def test_make_rejects_slice_steps():
    with pytest.raises(SiteError, match="step"):
        Site.make("x", 1, pos=slice(0, 10, 2))


def test_make_with_lists_and_sets():
    assert Site.make("head_out", 1, head=[2, 0]) == Site.parse("head_out.1[head={0,2}]")
    assert Site.make("head_out", 1, head={2, 0}) == Site.parse("head_out.1[head={0,2}]")
    assert str(Site.make("head_out", 1, head=[3, 1, 2])) == "head_out.1[head={1,2,3}]"


def test_make_keeps_keyword_order():
    site = Site.make("attn_pattern", 0, head=1, pos=3)
    assert site.sel == (("head", 1), ("pos", 3))
    assert str(site) == "attn_pattern.0[head=1,pos=3]"


def test_make_deduplicates_lists_like_parse():
    site = Site.make("head_out", 1, head=[0, 2, 2])
    assert site == Site.parse("head_out.1[head={0,2}]")
    assert Site.parse(str(site)) == site


def test_make_normalises_tuples_like_lists():
    site = Site.make("head_out", 1, head=(2, 0))
    assert site == Site.make("head_out", 1, head=[2, 0])
    assert Site.parse(str(site)) == site


def test_make_empty_set_is_rejected_or_round_trips():
    try:
        site = Site.make("head_out", 1, head=[])
    except SiteError:
        return
    assert Site.parse(str(site)) == site


def test_selection_is_a_dict_view():
    site = Site.parse("attn_pattern.0[head=1,pos=2:4]")
    assert site.selection == {"head": 1, "pos": Span(2, 4)}
    assert Site.parse("resid_pre.0").selection == {}


@pytest.mark.parametrize(
    "text, key",
    [
        ("head_out.5[head=2]", "head_out.5"),
        ("resid_pre.*[pos=7]", "resid_pre.*"),
        ("latent.z[dim=4]", "latent.z"),
        ("vision.head_out.3[head=*]", "vision.head_out.3"),
        ("logits", "logits"),
        ("x.-1", "x.-1"),
    ],
)
def test_key_drops_selections(text, key):
    assert Site.parse(text).key == key


def test_site_key():
    assert site_key("resid_pre", 0) == "resid_pre.0"
    assert site_key("latent.z", None) == "latent.z"
    assert site_key("resid_pre", "*") == "resid_pre.*"


@pytest.mark.parametrize(
    "text, pattern",
    [
        ("head_out.5[head=2]", False),
        ("resid_pre.*[pos=7]", True),
        ("resid_pre.*", True),
        ("head_out.5[head=*]", True),
        ("attn_pattern.0[head=1,pos=*]", True),
        ("resid_post.3[pos=2:5]", False),
        ("x.1[pos=:]", False),
        ("head_out.1[head={0,2}]", False),
        ("latent.z", False),
        ("latent.z[dim=*]", True),
    ],
)
def test_is_pattern(text, pattern):
    assert Site.parse(text).is_pattern is pattern


def test_with_replaces_layer_and_selections():
    site = Site.parse("attn_pattern.*[head=*,pos=3]")
    concrete = site.with_(layer=1, head=2)
    assert concrete == Site.parse("attn_pattern.1[head=2,pos=3]")
    assert not concrete.is_pattern
    # the original is untouched (frozen) and axis order is kept when replacing
    assert site == Site.parse("attn_pattern.*[head=*,pos=3]")
    assert site.with_(pos=4).sel == (("head", ANY), ("pos", 4))


def test_with_adds_a_new_axis_at_the_end():
    site = Site.parse("head_out.1[head=2]").with_(pos=Span(0, 3))
    assert str(site) == "head_out.1[head=2,pos=0:3]"


def test_with_layer_zero_is_not_treated_as_missing():
    assert Site.parse("resid_pre.*").with_(layer=0).layer == 0
    assert Site.parse("resid_pre.1").with_().layer == 1


def test_equality_and_hashing():
    a = Site.parse("head_out.5[head=2]")
    b = Site.make("head_out", 5, head=2)
    c = Site("head_out", 5, (("head", 2),))
    assert a == b == c
    assert hash(a) == hash(b) == hash(c)
    assert len({a, b, c}) == 1
    assert {a: 1}[Site.parse("head_out.5[head=2]")] == 1
    # sites that differ anywhere are different
    others = [
        Site.parse("head_out.5[head=3]"),
        Site.parse("head_out.4[head=2]"),
        Site.parse("head_out.5"),
        Site.parse("head_in.5[head=2]"),
        Site.parse("head_out.*[head=2]"),
        Site.parse("head_out.5[pos=2]"),
        Site.parse("head_out.5[head={2}]"),
        Site.parse("head_out.5[head=2:3]"),
    ]
    assert len({a, *others}) == len(others) + 1
    # spans and sets hash too
    s = {Site.parse("x.1[pos=2:5]"), Site.make("x", 1, pos=slice(2, 5)), Site.parse("x.1[pos={0,1}]")}
    assert len(s) == 2


def test_axis_order_matters_for_equality():
    # documents current behaviour: the order of the selections is part of a site's value
    assert Site.parse("attn_pattern.0[head=1,pos=3]") != Site.parse("attn_pattern.0[pos=3,head=1]")


def test_sites_are_frozen():
    site = Site.parse("head_out.5[head=2]")
    with pytest.raises(Exception):
        site.layer = 3  # type: ignore[misc]


def test_span_str():
    assert str(Span(2, 5)) == "2:5"
    assert str(Span(None, 5)) == ":5"
    assert str(Span(2)) == "2:"
    assert str(Span()) == ":"
    assert str(Span(-3, -1)) == "-3:-1"


# ---------------------------------------------------------------- grammar errors point at the character


def _caret_column(message: str, text: str) -> int:
    lines = message.split("\n")
    assert lines[-2] == "  " + text, message
    caret = lines[-1]
    assert caret.strip() == "^", message
    return caret.index("^") - 2


def _reported_index(message: str) -> int:
    m = re.search(r"at character (\d+)", message)
    assert m, message
    return int(m.group(1))


BAD = [
    # text, index of the offending character, words expected in the message
    ("head_out.1[hed=2", 16, "expected ']'"),
    ("head_out.1[head=]", 16, "expected an index"),
    ("head_out.1[head=2]x", 18, "unexpected text"),
    (".resid", 0, "site family"),
    ("head_out.1[head=2,head=3]", 18, "selected twice"),
    ("resid_pre.1.2", 11, "unexpected text"),
    ("1resid", 0, "site family"),
    ("", 0, "site family"),
    ("x.", 2, "layer number"),
    ("x[", 2, "axis name"),
    ("x.1[pos=-]", 8, "integer"),
    ("x.1[pos={}]", 9, "integer"),
    ("x.1[pos={1,}]", 11, "integer"),
    ("x.1[pos={1,2]", 12, "expected '}'"),
    ("x.1[pos 1]", 7, "expected '='"),
    ("x.*.a", 3, "unexpected text"),
    ("x.1[pos=1;head=2]", 9, "expected ']'"),
    ("x.1[pos=1] ", 10, "unexpected text"),
    ("x.1[pos=1:2:3]", 11, "expected ']'"),
    ("x.1[2=1]", 4, "axis name"),
    ("x.1[pos=first]", 8, "or 'last'"),
    ("x.1[pos=last:]", 12, "expected ']'"),
    ("x.1[pos=" + "9" * 5000 + "]", 8, "integer of 5000 digits"),
    ("x." + "1" * 19, 2, "integer of 19 digits"),
    ("x.1[pos={1," + "-" + "7" * 40 + "}]", 11, "integer of 40 digits"),
]


@pytest.mark.parametrize("text, index, words", BAD)
def test_bad_strings_raise_site_error_with_caret(text, index, words):
    with pytest.raises(SiteError) as info:
        Site.parse(text)
    message = str(info.value)
    assert repr(text) in message.split("\n")[0]
    assert words in message
    assert _reported_index(message) == index
    assert _caret_column(message, text) == index


@pytest.mark.parametrize("layer, words", [
    (1.0, "must be an int, got 1.0 (float)"),
    ("1", "layer '1' is a string"),
    (True, "must be an int, got True (bool)"),
    ([1], "must be an int, got [1] (list)"),
])
def test_site_layer_must_be_an_int_a_star_or_none(layer, words):
    with pytest.raises(SiteError) as info:
        Site("resid_post", layer)
    assert words in str(info.value) and "resid_post" in str(info.value)


def test_site_layer_accepts_integer_like_values():
    np = pytest.importorskip("numpy")
    site = Site("resid_post", np.int64(2), (("pos", np.int32(3)),))
    assert site == Site.parse("resid_post.2[pos=3]") and type(site.layer) is int
    assert hash(site) == hash(Site.parse("resid_post.2[pos=3]"))


@pytest.mark.parametrize("family", ["", "1x", "a-b", "a..b", None, 3])
def test_site_family_must_parse(family):
    with pytest.raises(SiteError, match="family is a name"):
        Site(family, 0)


@pytest.mark.parametrize("sel, words", [
    ((("pos", 1.5),), "1.5 (float) is not one"),
    ((("pos", "first"),), "'first' is not one"),
    ((("pos", None),), "None (NoneType) is not one"),
    ((("pos", ()),), "empty set"),
    ((("pos", (1, "a")),), "must be an int"),
    ((("pos", 1), ("pos", 2)), "selected twice"),
    ((("2x", 1),), "an axis is a name"),
    (("pos",), "pairs"),
    ("pos=1", "pairs"),
])
def test_site_selections_say_what_is_accepted(sel, words):
    with pytest.raises(SiteError) as info:
        Site("x", 1, sel)
    assert words in str(info.value)


def test_span_bounds_must_be_ints():
    with pytest.raises(SiteError, match="range's start must be an int"):
        Span(1.0, 3)
    with pytest.raises(SiteError, match="range's stop must be an int"):
        Site.make("x", 1, pos=slice(0, "3"))


def test_site_sequence_accepts_one_site_or_an_ordered_iterable_once():
    from crosspatch.sites.site import site_sequence

    site = Site.parse("x.1")
    assert site_sequence("x.1") == ("x.1",)
    assert site_sequence(site) == (site,)
    assert site_sequence(["x.1", site]) == ("x.1", site)
    assert site_sequence(s for s in ["a", "b"]) == ("a", "b")
    for bad, words in [({"x.1"}, "got set"), (5, "got int"), ([["x.1"]], "item 0 is a list"),
                       ({"x.1": 1}, "got dict"), (b"x.1", "got bytes"), ([None], "item 0 is a NoneType")]:
        with pytest.raises(SiteError, match="a site string, a Site, or a list or tuple of them") as info:
            site_sequence(bad)
        assert words in str(info.value)


def test_site_error_is_a_value_error():
    with pytest.raises(ValueError):
        Site.parse("head_out.1[head=]")


# ---------------------------------------------------------------- property: random valid sites round-trip
# The grammar alone, with a seeded generator; test_fuzz_sites.py takes hypothesis' strings through the engine.

_AXES = ["pos", "head", "dim", "neuron", "channel", "key_pos", "vocab", "x_1"]
_LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_"


def _random_ident(rng: random.Random) -> str:
    return rng.choice(_LETTERS) + "".join(rng.choice(_LETTERS + "0123456789") for _ in range(rng.randint(0, 6)))


def _random_int(rng: random.Random) -> int:
    return rng.choice([0, 1, -1, rng.randint(-50, 50), rng.randint(0, 10**6)])


def _random_selector(rng: random.Random):
    kind = rng.randrange(4)
    if kind == 0:
        return _random_int(rng)
    if kind == 1:
        return ANY
    if kind == 2:
        return Span(rng.choice([None, _random_int(rng)]), rng.choice([None, _random_int(rng)]))
    return tuple(sorted({_random_int(rng) for _ in range(rng.randint(1, 4))}))


def _random_site(rng: random.Random) -> Site:
    family = ".".join(_random_ident(rng) for _ in range(rng.randint(1, 3)))
    layer = rng.choice([None, ANY, _random_int(rng)])
    axes = rng.sample(_AXES, rng.randint(0, 3))
    return Site(family, layer, tuple((a, _random_selector(rng)) for a in axes))


def test_random_valid_sites_round_trip():
    rng = random.Random(20240611)
    seen_kinds = set()
    for _ in range(3000):
        site = _random_site(rng)
        text = str(site)
        parsed = Site.parse(text)
        assert parsed == site, text
        assert hash(parsed) == hash(site), text
        assert str(parsed) == text
        assert parsed.key == site_key(site.family, site.layer)
        assert parsed.is_pattern == (site.layer == ANY or ANY in site.selection.values())
        seen_kinds.update(type(v).__name__ for v in site.selection.values())
    assert seen_kinds == {"int", "str", "Span", "tuple"}  # the generator covers every selector kind


def test_random_strings_parse_or_raise_site_error():
    """Any string either parses to a site whose string form is canonical, or raises SiteError with a caret."""
    rng = random.Random(7)
    alphabet = "ab_1-2.*[]{},:=x0 "
    parsed = 0
    for _ in range(5000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 14)))
        try:
            site = Site.parse(text)
        except SiteError as e:
            message = str(e)
            assert _caret_column(message, text) == _reported_index(message), text
            continue
        parsed += 1
        canonical = str(site)
        assert Site.parse(canonical) == site, text
        assert str(Site.parse(canonical)) == canonical, text
    assert parsed > 20  # the fuzz really reaches valid sites


def test_split_tower():
    from crosspatch.sites.site import split_tower

    assert split_tower("vision.head_in") == ("vision.", "head_in")
    assert split_tower("head_in") == ("", "head_in")
    assert split_tower("latent.z") == ("latent.", "z")


# ---------------------------------------------------------------- the command line


@pytest.mark.parametrize("model", ["", "   "])
def test_sites_command_with_an_empty_model_is_one_line_exit_2(model, capsys):
    from crosspatch.cli import app

    assert app.main(["sites", model]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert "MODEL is empty" in err and "zoo list" in err
