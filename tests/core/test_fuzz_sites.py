"""Property-based fuzzing of site strings through parse, capture, run and cache lookups.

Site strings are drawn from the grammar (families, layers and axes of the model, and some that it
does not have; ints, ranges, sets, ``*`` and ``last``, in and out of range) and then mutated (a
character inserted, dropped or replaced, a number blown up to thousands of digits). Each goes
through :meth:`Site.parse`, ``capture``, ``run`` with an ``Add`` and a lookup in a cache, on the
conftest toy net (with an attention mask, padded on the right or on the left) and on a 2-layer
GPT-2 built from a config. Every call must either succeed or raise :class:`SiteError`; a run that
succeeds must change exactly the entries an independent reading of the selection names (so an
out-of-range or empty selection can never run as a no-op); and no hook is left on any module.

Each example has a time bound (hypothesis' ``deadline``). ``make test`` runs a few hundred
examples, deterministically. Set ``CROSSPATCH_FUZZ=1`` for thousands of random ones
(``CROSSPATCH_FUZZ=20000`` for that many per model), e.g.
``CROSSPATCH_FUZZ=1 python -m pytest tests/core/test_fuzz_sites.py``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import crosspatch as cp  # noqa: E402
from crosspatch.sites.catalog import Catalog  # noqa: E402
from crosspatch.sites.site import ANY, LAST, POSITION_AXES, Site, SiteError, Span  # noqa: E402

_FUZZ = os.environ.get("CROSSPATCH_FUZZ", "")
_MANY = int(_FUZZ) if _FUZZ.isdigit() and int(_FUZZ) > 1 else 5000


def _settings(examples: int, many: int) -> Any:
    """A few hundred deterministic examples by default; ``many`` random ones under CROSSPATCH_FUZZ."""
    common = dict(
        deadline=timedelta(seconds=5),
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
        database=None,
    )
    if _FUZZ:
        return settings(max_examples=many, **common)
    return settings(max_examples=examples, derandomize=True, **common)


# -- the models and their inputs --------------------------------------------------------------------

HOOK_DICTS = (
    "_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs",
    "_forward_hooks_always_called", "_backward_hooks", "_backward_pre_hooks",
)


def hook_census(module: torch.nn.Module) -> dict:
    """Every hook on every module, and torch's global module hooks."""
    from torch.nn.modules import module as torch_module

    globals_ = {
        name: list(getattr(torch_module, name, {}).keys())
        for name in ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks")
    }
    per_module = {
        name: {attr: list(getattr(sub, attr, {}).keys()) for attr in HOOK_DICTS}
        for name, sub in module.named_modules()
    }
    return {"global": globals_, "modules": per_module}


@dataclass
class Subject:
    """A wrapped model with padded inputs, its clean captures and the hook census to keep."""

    model: Any
    inputs: dict
    mask: torch.Tensor
    sizes: dict[str, int]
    clean: Any
    census: dict

    @property
    def catalog(self) -> Catalog:
        return self.model.catalog


def _subject(model: Any, inputs: dict) -> Subject:
    prepared = model.prepare(inputs)
    keys = [f"{f.name}.*" if f.layers is not None else f.name for f in model.catalog]
    clean = model.capture(inputs, keys)
    return Subject(model, inputs, inputs["attention_mask"], model.adapter.sizes(prepared), clean, hook_census(model.module))


def _toy_subjects() -> dict[str, Subject]:
    from conftest import ToyNet, toy_adapter

    class MaskedToyAdapter(type(toy_adapter())):
        name = "toy_masked"

        def prepare(self, model, inputs):
            out = super().prepare(model, inputs)
            out["attention_mask"] = inputs["attention_mask"]
            return out

    m = cp.wrap(ToyNet().eval(), MaskedToyAdapter())
    x = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(0))
    right, left = torch.ones(3, 5, dtype=torch.long), torch.ones(3, 5, dtype=torch.long)
    right[0, 3:] = 0
    right[2, 4:] = 0
    left[1, :2] = 0
    return {pad: _subject(m, {"x": x, "attention_mask": mask}) for pad, mask in (("right", right), ("left", left))}


def _gpt2_subjects() -> dict[str, Subject]:
    from conftest import padded_prompts, tiny_gpt2

    m = cp.wrap(tiny_gpt2())
    return {pad: _subject(m, padded_prompts(9, pad=pad)) for pad in ("right", "left")}


@pytest.fixture(scope="module")
def toy_subjects() -> dict[str, Subject]:
    return _toy_subjects()


@pytest.fixture(scope="module")
def gpt2_subjects() -> dict[str, Subject]:
    pytest.importorskip("transformers")
    return _gpt2_subjects()


# -- site strings from the grammar, and mutations of them -----------------------------------------------

_OTHER_AXES = ("head", "x_1", "vocab", "pos", "key_pos")
_ALPHABET = "ab_1-2.*[]{},:=x0 lt"


def _int(lo: int, hi: int) -> st.SearchStrategy[int]:
    """Mostly in ``lo..hi`` (the edges of an axis), now and then far outside."""
    return st.one_of(*[st.integers(lo, hi)] * 9, st.sampled_from([10**6, -(10**6)]))


def _selector(axis: str, size: int) -> st.SearchStrategy[str]:
    """Ints, ranges and sets at and past the axis' edges; ``*`` and ``last`` (on positions) less often."""
    bound = st.one_of(st.none(), _int(-size - 1, size + 1))
    index = _int(-size - 1, size).map(str)
    span = st.tuples(bound, bound).map(lambda b: f"{'' if b[0] is None else b[0]}:{'' if b[1] is None else b[1]}")
    group = st.lists(_int(-size - 1, size), min_size=1, max_size=3).map(lambda v: "{" + ",".join(map(str, v)) + "}")
    rare = st.sampled_from([ANY, LAST] if axis in POSITION_AXES else [ANY, ANY, ANY, LAST])
    common = [index, index, index, span, span, group]
    return st.one_of(*common, *([st.just(LAST)] * 2 if axis in POSITION_AXES else []), rare)


@st.composite
def grammar_site(draw: Any, catalog: Catalog, sizes: dict[str, int]) -> str:
    """A site string: mostly a family of the model, a layer it has and its own axes; sometimes not.
    (Hypothesis favours the first, simplest choice of each draw: it is the valid one here.)"""
    fam = draw(st.sampled_from(list(catalog.families.values())))
    family = draw(st.sampled_from([fam.name] * 9 + ["nope", "resid", "x.y"]))
    if fam.layers is None:
        layer = draw(st.sampled_from([None] * 8 + [0, ANY]))
    else:
        layer = draw(st.one_of(*[st.integers(-fam.layers, fam.layers - 1)] * 8, st.just(ANY), st.just(None),
                               _int(-fam.layers - 1, fam.layers)))
    text = family if layer is None else f"{family}.{layer}"
    names = list(fam.axis_names)
    chosen = draw(st.lists(st.sampled_from(names), max_size=len(names), unique=True))
    if draw(st.integers(0, 9)) == 9:
        chosen.append(draw(st.sampled_from([a for a in _OTHER_AXES if a not in chosen])))
    if chosen:
        parts = []
        for axis in chosen:
            size = fam.axis(axis).size if axis in names else None
            parts.append(f"{axis}={draw(_selector(axis, size or sizes.get(axis, 5)))}")
        text += "[" + ",".join(parts) + "]"
    return text


@st.composite
def mutated(draw: Any, text: str) -> str:
    """``text`` with a few edits: a character inserted, dropped or replaced, or a number made huge."""
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["insert", "drop", "replace", "digits"]))
        at = draw(st.integers(0, len(text)))
        if kind == "insert":
            text = text[:at] + draw(st.sampled_from(_ALPHABET)) + text[at:]
        elif kind == "drop" and text:
            text = text[:at] + text[at + 1:]
        elif kind == "replace" and at < len(text):
            text = text[:at] + draw(st.sampled_from(_ALPHABET)) + text[at + 1:]
        elif kind == "digits":
            text = text[:at] + "9" * draw(st.sampled_from([3, 19, 400, 5000])) + text[at:]
    return text


def site_texts(subject: Subject) -> st.SearchStrategy[str]:
    plain = grammar_site(subject.catalog, subject.sizes)
    return st.one_of(plain, plain, plain, plain, plain.flatmap(mutated))


# -- an independent reading of a site: valid or not, and which entries it names -----------------------


def _negative(value: Any) -> bool:
    if isinstance(value, Span):
        return any(v is not None and v < 0 for v in (value.start, value.stop))
    if isinstance(value, tuple):
        return any(v < 0 for v in value)
    return isinstance(value, int) and value < 0


def expected_entries(subject: Subject, site: Site, write: bool) -> torch.Tensor | None:
    """For a concrete site: a bool mask ``[rows, *axes]`` of the entries a write changes; None when the
    site must be refused. For ``write=False`` (capture): an empty tensor when it must be accepted."""
    catalog, rows = subject.catalog, subject.mask.shape[0]
    fam = catalog.families.get(site.family)
    if fam is None:
        return None
    if fam.layers is None:
        if site.layer is not None:
            return None
    elif site.layer is None or (site.layer != ANY and not -fam.layers <= site.layer < fam.layers):
        return None
    if write and (not fam.writable or site.is_pattern):
        return None
    shape = [fam.axis(a).size or subject.sizes[a.name if hasattr(a, "name") else a] for a in fam.axis_names]
    picks: list[Any] = []
    for axis in fam.axis_names:
        size = shape[len(picks)]
        value = site.selection.get(axis)
        if value is None or value == ANY:
            picks.append(range(size))
            continue
        if value == LAST:
            if axis not in POSITION_AXES:
                return None
            picks.append(LAST)
            continue
        if isinstance(value, int):
            if not -size <= value < size:
                return None
            picks.append([value % size])
        elif isinstance(value, Span):
            if any(v is not None and not -size <= v <= size for v in (value.start, value.stop)):
                return None
            chosen = range(size)[slice(value.start, value.stop)]
            if not chosen:
                return None
            picks.append(chosen)
        else:
            if any(not -size <= v < size for v in value):
                return None
            picks.append([v % size for v in value])
        right_padded = bool((subject.mask[:, -1] == 0).any())
        if write and axis in POSITION_AXES and _negative(value) and right_padded and size == subject.mask.shape[1]:
            return None
    if set(site.selection) - set(fam.axis_names):
        return None
    if not write:
        return torch.zeros(0)
    last = [int(row.nonzero().max()) for row in subject.mask]
    entries = torch.zeros(rows, *shape, dtype=torch.bool)
    for r in range(rows):
        index = [[last[r]] if p == LAST else list(p) for p in picks]
        grid = torch.meshgrid(*[torch.tensor(i) for i in index], indexing="ij")
        entries[(torch.full_like(grid[0], r), *grid)] = True
    return entries


# -- the property ----------------------------------------------------------------------------------


def check_site(subject: Subject, text: str) -> str:
    """Parse, capture, run and look up ``text``: each succeeds or raises SiteError, as read independently.
    Returns how far it got: ``"unparsed"``, ``"refused"`` (by the run) or ``"ran"``."""
    m = subject.model
    try:
        site = Site.parse(text)
    except SiteError:
        site = None
    # capture: the family-and-layer it names, checked against the model and the inputs' sizes
    try:
        m.capture(subject.inputs, text)
        captured = True
    except SiteError:
        captured = False
    assert hook_census(m.module) == subject.census, f"capture of {text!r} left a hook"
    if site is not None:
        assert captured == (expected_entries(subject, site, write=False) is not None), text
    # run: an Add of 1 at the site; the run's own capture of the site shows what it changed
    expected = None if site is None else expected_entries(subject, site, write=True)
    key = subject.catalog.resolve(site).key if expected is not None else None  # "x.-1" is kept as "x.1"
    try:
        run = m.run(subject.inputs, {text: cp.Add(torch.tensor(1.0))}, capture=key or ())
        ran = True
    except SiteError:
        ran = False
    assert hook_census(m.module) == subject.census, f"run of {text!r} left a hook"
    assert ran == (expected is not None), f"{text!r}: {'ran' if ran else 'refused'}"
    if ran:
        # +1 where the site names; elsewhere at most the rounding of another attention kernel (attn_pattern's)
        changed = (run.cache[key] - subject.clean[key]).abs() > 0.5
        assert changed.any(), f"{text!r} ran as a no-op"
        assert torch.equal(changed, expected), f"{text!r} changed other entries than it names"
    # a lookup in a cache selects like a run
    if expected is not None:
        try:
            got = subject.clean[subject.catalog.resolve(site)]
        except SiteError:
            got = None
        assert got is not None, text
        assert got.numel() == int(expected[0].sum()) * expected.shape[0], text
    return "unparsed" if site is None else ("ran" if ran else "refused")


def fuzz(subject: Subject, examples: int, many: int) -> dict[str, int]:
    """Run :func:`check_site` on generated strings; how many ended each way."""
    seen = {"unparsed": 0, "refused": 0, "ran": 0}

    @_settings(examples=examples, many=many)
    @given(site_texts(subject))
    def check(text: str) -> None:
        seen[check_site(subject, text)] += 1

    check()
    return seen


@pytest.mark.parametrize("pad", ["right", "left"])
def test_fuzzed_sites_on_the_toy_net(toy_subjects, pad):
    seen = fuzz(toy_subjects[pad], examples=300, many=_MANY)
    assert min(seen.values()) >= 10, seen  # the strings reach every outcome


@pytest.mark.parametrize("pad", ["right", "left"])
def test_fuzzed_sites_on_gpt2(gpt2_subjects, pad):
    seen = fuzz(gpt2_subjects[pad], examples=100, many=max(_MANY // 5, 100))
    assert min(seen.values()) >= 5, seen


@pytest.mark.parametrize("text", [
    "hidden.1[pos=100:200]", "hidden.1[pos=4:2]", "hidden.1[pos=5:]", "hidden.1[pos=-4:0]", "hidden.1[pos=-1]",
    "hidden.1[pos=last]", "hidden.1[pos=" + "9" * 5000 + "]", "out[class={0,-1},pos=-2:]", "hidden.-3", "out.0",
])
def test_the_oracle_on_known_cases(toy_subjects, text):
    """The fuzz's own reading of sites, on cases whose answer is known."""
    for pad, subject in toy_subjects.items():
        check_site(subject, text)
    right = toy_subjects["right"]
    assert expected_entries(right, Site.parse("hidden.1[pos=-1]"), write=True) is None
    assert expected_entries(toy_subjects["left"], Site.parse("hidden.1[pos=-1]"), write=True).sum() == 3 * 4
    assert expected_entries(right, Site.parse("hidden.1[pos=5:]"), write=True) is None
