"""The engine, checked against a hand-written forward of the toy net.

ToyNet: ``h = x``; for each layer ``l``: ``hidden_in.l = h``, ``hidden.l = h @ W_l.T + b_l`` (the
Linear's output, *before* the ReLU), ``h = relu(hidden.l)``; ``out = h @ W_head.T + b_head``.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import crosspatch as cp
from crosspatch.sites.catalog import Catalog

# ---------------------------------------------------------------- hand computations


def lin(layer: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return x @ layer.weight.T + layer.bias


def hand(net, x, edits=None):
    """The toy forward written out, with ``edits[key](full_activation) -> new`` applied at each site."""
    edits = edits or {}
    acts: dict[str, torch.Tensor] = {}

    def at(key, value):
        if key in edits:
            value = edits[key](value.clone())
        acts[key] = value
        return value

    with torch.no_grad():
        h = x
        for l, layer in enumerate(net.layers):
            h = at(f"hidden_in.{l}", h)
            h = at(f"hidden.{l}", lin(layer, h))
            h = torch.relu(h)
        out = at("out", lin(net.head, h))
    return out, acts


def setting(index, value_fn):
    """An edit that writes ``value_fn(selected)`` into ``full[:, *index]``."""

    def edit(v):
        v[(slice(None), *index)] = value_fn(v[(slice(None), *index)])
        return v

    return edit


def zero_at(*index):
    return setting(index, torch.zeros_like)


HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_backward_hooks",
    "_backward_pre_hooks",
)


def hook_state(module: torch.nn.Module) -> dict:
    return {
        name: {attr: list(getattr(sub, attr, {}).items()) for attr in HOOK_DICTS}
        for name, sub in module.named_modules()
    }


@pytest.fixture
def x():
    g = torch.Generator().manual_seed(11)
    return torch.randn(3, 5, 4, generator=g)


@pytest.fixture
def x_other():
    g = torch.Generator().manual_seed(12)
    return torch.randn(3, 5, 4, generator=g)


close = torch.testing.assert_close


# ---------------------------------------------------------------- capture


def test_capture_every_family_equals_hand_forward(toy, x):
    run = toy.run(x, capture=["hidden_in.*", "hidden.*", "out"])
    out, acts = hand(toy.module, x)
    assert set(run.cache) == set(acts)
    for key, value in acts.items():
        close(run.cache[key], value)
        assert run.cache[key].shape == value.shape
    close(run.output, out)
    # hidden_in.1 is relu(hidden.0): the families are wired as documented
    close(run.cache["hidden_in.1"], torch.relu(run.cache["hidden.0"]))
    # the toy activations actually exercise the ReLU (some but not all clipped)
    assert 0 < (run.cache["hidden.0"] < 0).float().mean() < 1


def test_capture_returns_only_what_was_asked(toy, x):
    cache = toy.capture(x, "hidden.1")
    assert list(cache) == ["hidden.1"]
    assert cache.axes["hidden.1"] == ("pos", "dim")
    assert cache.batch_size == 3
    with pytest.raises(KeyError, match="hidden.0.*hidden.1"):
        cache["hidden.0"]


@pytest.mark.parametrize(
    "sel, index",
    [
        ("pos=1", lambda t: t[:, 1:2]),
        ("pos=-1", lambda t: t[:, 4:5]),
        ("pos=-2", lambda t: t[:, 3:4]),
        ("pos=1:3", lambda t: t[:, 1:3]),
        ("pos=3:", lambda t: t[:, 3:]),
        ("pos={0,2}", lambda t: t[:, [0, 2]]),
        ("dim=2", lambda t: t[:, :, 2:3]),
        ("pos=1,dim={0,3}", lambda t: t[:, 1:2][:, :, [0, 3]]),
        ("pos={0,4},dim={1,2}", lambda t: t[:, [0, 4]][:, :, [1, 2]]),
    ],
)
def test_cache_indexing_with_selection_keeps_every_axis(toy, x, sel, index):
    cache = toy.capture(x, "hidden.0")
    full = cache["hidden.0"]
    got = cache[f"hidden.0[{sel}]"]
    assert got.ndim == 3
    assert torch.equal(got, index(full))


def test_cache_indexing_two_sets_is_an_outer_product(toy, x):
    full = toy.capture(x, "hidden.0")["hidden.0"]
    got = toy.capture(x, "hidden.0")["hidden.0[pos={0,4},dim={1,2}]"]
    assert got.shape == (3, 2, 2)
    for i, p in enumerate([0, 4]):
        for j, d in enumerate([1, 2]):
            assert torch.equal(got[:, i, j], full[:, p, d])


def test_capture_accepts_a_site_with_selection_and_stores_the_full_tensor(toy, x):
    cache = toy.capture(x, "hidden.0[pos=1]")
    assert cache["hidden.0"].shape == (3, 5, 4)


# ---------------------------------------------------------------- interventions == hand-edited forward


def test_zero_equals_hand_zeroed_forward(toy, x):
    run = toy.run(x, {"hidden.0[pos=1]": cp.Zero()}, capture=["hidden.*", "hidden_in.*"])
    out, acts = hand(toy.module, x, {"hidden.0": zero_at(1)})
    close(run.output, out)
    for key in run.cache:
        close(run.cache[key], acts[key])
    # positions other than 1 are untouched, position 1 differs from the clean run
    clean = toy.run(x).output
    assert torch.equal(run.output[:, [0, 2, 3, 4]], clean[:, [0, 2, 3, 4]])
    assert not torch.allclose(run.output[:, 1], clean[:, 1])


def test_zero_on_module_input_family(toy, x):
    run = toy.run(x, {"hidden_in.1[dim={0,2}]": cp.Zero()})
    out, _ = hand(toy.module, x, {"hidden_in.1": zero_at(slice(None), [0, 2])})
    close(run.output, out)


def test_zero_on_the_first_layer_input_is_the_input_zeroed(toy, x):
    run = toy.run(x, {"hidden_in.0[pos=0]": cp.Zero()})
    x2 = x.clone()
    x2[:, 0] = 0
    close(run.output, hand(toy.module, x2)[0])


def test_patch_equals_hand_forward_with_source_slice(toy, x, x_other):
    src = toy.capture(x_other, "hidden.1")
    run = toy.run(x, {"hidden.1[pos=2:4,dim=1]": cp.Patch(src)})
    want = src["hidden.1"][:, 2:4, 1:2]
    out, _ = hand(toy.module, x, {"hidden.1": setting((slice(2, 4), slice(1, 2)), lambda s: want)})
    close(run.output, out)


def test_add_scale_on_output_family(toy, x):
    vec = torch.tensor([1.0, -2.0, 0.5])
    run = toy.run(x, {"out[pos=-1]": cp.Add(vec, alpha=2.0)})
    close(run.output, hand(toy.module, x, {"out": setting((slice(4, 5),), lambda s: s + 2 * vec)})[0])
    run = toy.run(x, {"out[class=1]": cp.Scale(-3.0)})
    close(run.output, hand(toy.module, x, {"out": setting((slice(None), slice(1, 2)), lambda s: -3 * s)})[0])


def test_interventions_at_two_layers(toy, x):
    run = toy.run(
        x,
        {"hidden.0[pos=1]": cp.Zero(), "hidden.1[dim=3]": cp.Scale(2.5)},
        capture=["hidden.1"],
    )
    out, acts = hand(
        toy.module,
        x,
        {"hidden.0": zero_at(1), "hidden.1": setting((slice(None), slice(3, 4)), lambda s: 2.5 * s)},
    )
    close(run.output, out)
    close(run.cache["hidden.1"], acts["hidden.1"])


def test_two_interventions_on_one_site_compose_in_order(toy, x):
    vec = torch.tensor([1.0, 2.0, 3.0, 4.0])
    add_then_scale = toy.run(x, [("hidden.0[pos=1]", cp.Add(vec)), ("hidden.0", cp.Scale(2.0))], capture="hidden.0")
    scale_then_add = toy.run(x, [("hidden.0", cp.Scale(2.0)), ("hidden.0[pos=1]", cp.Add(vec))], capture="hidden.0")
    h = toy.capture(x, "hidden.0")["hidden.0"]
    want1 = 2 * h
    want1[:, 1] = 2 * (h[:, 1] + vec)
    want2 = 2 * h
    want2[:, 1] = 2 * h[:, 1] + vec
    close(add_then_scale.cache["hidden.0"], want1)
    close(scale_then_add.cache["hidden.0"], want2)
    assert not torch.allclose(add_then_scale.output, scale_then_add.output)
    close(add_then_scale.output, hand(toy.module, x, {"hidden.0": lambda v: want1})[0])


def test_capture_at_an_intervened_site_sees_the_new_value(toy, x):
    run = toy.run(x, {"hidden.0[pos=1]": cp.Zero()}, capture=["hidden.0"])
    assert torch.all(run.cache["hidden.0"][:, 1] == 0)


# ---------------------------------------------------------------- selections


@pytest.mark.parametrize(
    "site, key, index",
    [
        ("hidden.0[pos=1]", "hidden.0", (slice(1, 2),)),
        ("hidden.0[pos=1:3]", "hidden.0", (slice(1, 3),)),
        ("hidden.0[pos=:2]", "hidden.0", (slice(0, 2),)),
        ("hidden.0[pos={0,2}]", "hidden.0", ([0, 2],)),
        ("hidden.0[dim={1,3}]", "hidden.0", (slice(None), [1, 3])),
        ("hidden.0[pos=-1]", "hidden.0", (slice(4, 5),)),
        ("hidden.0[pos=-2,dim=-1]", "hidden.0", (slice(3, 4), slice(3, 4))),
        ("hidden.-1[pos=0]", "hidden.1", (slice(0, 1),)),
        ("hidden.0[pos=1,dim={0,3}]", "hidden.0", (slice(1, 2), [0, 3])),
        (
            "hidden.0[pos={0,3},dim={1,2}]",
            "hidden.0",
            (torch.tensor([0, 3]).view(-1, 1), torch.tensor([1, 2]).view(1, -1)),
        ),
        ("hidden.0[dim={2,-1}]", "hidden.0", (slice(None), [2, 3])),
    ],
)
def test_selection_forms_edit_exactly_the_selected_entries(toy, x, site, key, index):
    run = toy.run(x, {site: cp.Scale(3.0)}, capture=key)
    out, acts = hand(toy.module, x, {key: setting(index, lambda s: 3 * s)})
    close(run.cache[key], acts[key])
    close(run.output, out)
    # and exactly those: the number of changed entries equals the selection's size
    clean = toy.capture(x, key)[key]
    n_selected = torch.zeros(clean.shape[1:])[index].numel()
    changed = (run.cache[key] != clean).sum().item()
    assert changed == 3 * n_selected  # every selected entry is non-zero for this input


def test_two_set_axes_are_an_outer_product_not_pairs(toy, x):
    h = toy.run(x, {"hidden.0[pos={0,3},dim={1,2}]": cp.Zero()}, capture="hidden.0").cache["hidden.0"]
    zeroed = {(p, d) for p in range(5) for d in range(4) if torch.all(h[:, p, d] == 0)}
    assert zeroed == {(0, 1), (0, 2), (3, 1), (3, 2)}


def test_out_of_range_selection_raises_site_error(toy, x):
    with pytest.raises(cp.SiteError, match="out of range"):
        toy.run(x, {"hidden.0[dim=4]": cp.Zero()})
    with pytest.raises(cp.SiteError, match="out of range"):
        toy.run(x, {"hidden.0[pos=5]": cp.Zero()})  # pos size comes from the input
    with pytest.raises(cp.SiteError, match="layer 2 is out of range"):
        toy.run(x, {"hidden.2": cp.Zero()})


# ---------------------------------------------------------------- batched bounds


def test_batched_bounds_on_row_blocks_equal_one_at_a_time_runs(toy):
    g = torch.Generator().manual_seed(3)
    prompts, other = torch.randn(2, 5, 4, generator=g), torch.randn(2, 5, 4, generator=g)
    src = toy.capture(other, "hidden.1")
    interventions = [
        ("hidden.0[pos=1]", cp.Zero()),
        ("hidden.1[dim=2]", cp.Patch(src)),
        ("hidden.0", cp.Noise(seed=4)),  # default std: the std of this block's activation
        ("hidden.1[pos={0,3}]", cp.Resample(src, seed=1)),
        ("hidden_in.1", cp.Scale(0.5)),
    ]
    k = len(interventions) + 1  # plus one untouched block
    tiled = prompts.repeat(k, 1, 1)
    bounds = [cp.Bound(site, iv, rows=slice(2 * j, 2 * j + 2)) for j, (site, iv) in enumerate(interventions)]
    batched = toy.run(tiled, bounds, capture=["hidden.0", "hidden.1"])
    for j, (site, iv) in enumerate(interventions):
        single = toy.run(prompts, {site: iv}, capture=["hidden.0", "hidden.1"])
        rows = slice(2 * j, 2 * j + 2)
        close(batched.output[rows], single.output)
        close(batched.cache["hidden.0"][rows], single.cache["hidden.0"])
        close(batched.cache["hidden.1"][rows], single.cache["hidden.1"])
    close(batched.output[-2:], toy.run(prompts).output)


def test_bound_without_rows_and_with_rows_compose(toy, x):
    run = toy.run(
        x,
        [cp.Bound("hidden.0[pos=1]", cp.Scale(2.0)), cp.Bound("hidden.0[pos=1]", cp.Zero(), rows=slice(1, 2))],
        capture="hidden.0",
    )
    h = toy.capture(x, "hidden.0")["hidden.0"]
    want = h.clone()
    want[:, 1] *= 2
    want[1, 1] = 0
    close(run.cache["hidden.0"], want)


def test_bound_accepts_a_site_string_or_object(toy, x):
    a = toy.run(x, [cp.Bound("hidden.0[pos=1]", cp.Zero())]).output
    b = toy.run(x, [cp.Bound(cp.Site.make("hidden", 0, pos=1), cp.Zero())]).output
    assert torch.equal(a, b)


def test_rows_outside_the_batch_raise(toy, x):
    with pytest.raises(ValueError, match="outside the batch of 3"):
        toy.run(x, [cp.Bound("hidden.0", cp.Zero(), rows=slice(0, 4))])
    with pytest.raises(ValueError, match="outside the batch"):
        toy.run(x, [cp.Bound("hidden.0", cp.Zero(), rows=slice(2, 7))])


def test_rows_starting_past_the_batch_raise(toy, x):
    with pytest.raises(ValueError, match="outside the batch"):
        toy.run(x, [cp.Bound("hidden.0", cp.Zero(), rows=slice(5, None))])


# ---------------------------------------------------------------- hooks: user hooks survive, ours are removed


def test_user_hooks_survive_a_run_and_still_fire(toy, x):
    net = toy.module
    calls = []

    def user_fwd(module, args, output):
        calls.append("fwd")
        return output * 2  # a user hook that changes the output

    def user_pre(module, args):
        calls.append("pre")

    h1 = net.layers[0].register_forward_hook(user_fwd)
    h2 = net.head.register_forward_pre_hook(user_pre)
    try:
        before = hook_state(net)
        run = toy.run(x, {"hidden.0[pos=1]": cp.Zero(), "hidden_in.1": cp.Scale(1.0)}, capture=["hidden.0", "out"])
        assert calls == ["fwd", "pre"]
        assert hook_state(net) == before
        # the user's hook ran before ours: the capture sees the doubled output, then our zero
        want = 2 * lin(net.layers[0], x)
        want[:, 1] = 0
        close(run.cache["hidden.0"], want)
        calls.clear()
        with torch.no_grad():
            after = net(x)
        assert calls == ["fwd", "pre"]
        close(after, hand(net, x, {"hidden.0": lambda v: 2 * v})[0])
    finally:
        h1.remove()
        h2.remove()


def test_a_normal_run_leaves_no_hook(toy, x):
    before = hook_state(toy.module)
    toy.run(x, {"hidden.0": cp.Zero(), "hidden_in.1[pos=2]": cp.Zero()}, capture=["hidden_in.*", "hidden.*", "out"])
    assert hook_state(toy.module) == before
    assert all(not v for mod in before.values() for v in mod.values())


class Boom(cp.Intervention):
    kind = "boom_test"

    def apply(self, x, ctx):
        raise RuntimeError("boom inside apply")


class WrongShape(cp.Intervention):
    kind = "wrong_shape_test"

    def apply(self, x, ctx):
        return x[:, :1]


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda x, src: {"hidden.1": Boom()}, RuntimeError, "boom inside apply"),
        (lambda x, src: {"hidden.1[pos=7]": cp.Zero()}, cp.SiteError, "out of range"),
        (lambda x, src: {"hidden.1": WrongShape()}, cp.SiteError, r"WrongShape at hidden.1 returned shape"),
        (lambda x, src: {"hidden.1": cp.Patch(src)}, cp.SiteError, "source has 2 rows but the target has 3"),
        (lambda x, src: {"out": cp.Add(torch.ones(5))}, cp.SiteError, r"Add.vector has shape \(5,\)"),
    ],
)
def test_no_hook_remains_after_an_exception_inside_a_run(toy, x, make, error, match):
    src = toy.capture(x[:2], "hidden.1")
    before = hook_state(toy.module)
    clean = toy.run(x).output
    with pytest.raises(error, match=match):
        # hooks at earlier sites are installed and fire before the failure
        toy.run(x, {"hidden_in.0": cp.Scale(1.0), "hidden.0[pos=0]": cp.Zero(), **make(x, src)}, capture=["out"])
    assert hook_state(toy.module) == before
    assert torch.equal(toy.run(x).output, clean)
    with torch.no_grad():
        close(toy.module(x), clean)


def test_no_hook_remains_when_the_forward_itself_fails(toy, x):
    before = hook_state(toy.module)
    bad = torch.randn(3, 5, 6)  # wrong feature size: the first Linear fails after the pre-hook ran
    with pytest.raises(RuntimeError):
        toy.run(bad, {"hidden_in.0": cp.Scale(1.0), "hidden.1": cp.Zero()}, capture=["out", "hidden_in.0"])
    assert hook_state(toy.module) == before


def test_no_hook_remains_when_a_metric_fails_in_a_method(toy, x, x_other):
    before = hook_state(toy.module)

    def bad_metric(output):
        raise ZeroDivisionError("metric failed")

    with pytest.raises(ZeroDivisionError, match="metric failed"):
        cp.activation_patching(toy, x, x_other, "hidden.*[pos=*]", bad_metric, progress=False)
    assert hook_state(toy.module) == before


def test_gpt2_no_hook_or_attention_switch_remains_after_failure(gpt2, ids):
    m = cp.wrap(gpt2)
    before = hook_state(gpt2)
    impl = gpt2.config._attn_implementation
    clean = m.run(ids).output
    with pytest.raises(RuntimeError, match="boom inside apply"):
        m.run(
            ids,
            {"resid_pre.0[pos=1]": cp.Zero(), "head_out.0[head=1]": cp.Zero(), "mlp_act.1": Boom()},
            capture=["attn_pattern.0", "resid_mid.*", "resid_post.1", "logits"],
        )
    assert hook_state(gpt2) == before
    assert gpt2.config._attn_implementation == impl
    m.run(ids, {"attn_pattern.1[head=0]": cp.Scale(1.0)}, capture=["resid_mid.0", "head_out.*"])
    assert hook_state(gpt2) == before
    assert gpt2.config._attn_implementation == impl
    assert torch.equal(m.run(ids).output, clean)


# ---------------------------------------------------------------- gradients and inference mode


def test_without_grad_outputs_and_captures_are_inference_tensors(toy, x):
    run = toy.run(x, {"hidden.0[pos=1]": cp.Zero()}, capture=["hidden.0", "hidden.1"])
    assert run.output.is_inference()
    assert all(v.is_inference() for v in run.cache.values())
    assert not run.output.requires_grad


def test_grad_capture_has_grad_fn_and_matches_hand_gradient(toy, x):
    net = toy.module.double()
    xd = x.double()
    run = toy.run(xd, capture=["hidden.0"], grad=True)
    h0 = run.cache["hidden.0"]
    assert h0.grad_fn is not None and not run.output.is_inference()
    (g,) = torch.autograd.grad(run.output[:, -1, 0].sum(), h0)
    # hand: d out[c=0] / d hidden.0 = relu'(h0) * W1^T (relu'(h1) * W_head[0])
    with torch.no_grad():
        h1 = lin(net.layers[1], torch.relu(h0))
        upstream = (h1 > 0).double() * net.head.weight[0]
        want = (h0 > 0).double() * (upstream @ net.layers[1].weight)
        want[:, :-1] = 0  # only the last position feeds out[:, -1]
    close(g, want)
    # finite differences through the engine itself (Add a small step at one entry)
    eps = 1e-6
    for p, d in [(4, 0), (4, 3), (2, 1)]:
        step = torch.zeros(4, dtype=torch.float64)
        step[d] = eps
        plus = toy.run(xd, {f"hidden.0[pos={p}]": cp.Add(step)}).output[:, -1, 0]
        minus = toy.run(xd, {f"hidden.0[pos={p}]": cp.Add(-step)}).output[:, -1, 0]
        close((plus - minus) / (2 * eps), g[:, p, d], atol=1e-6, rtol=1e-5)


def test_grad_through_an_intervened_site(toy, x):
    net = toy.module
    run = toy.run(x, {"hidden.0[pos=4]": cp.Scale(0.0)}, capture=["hidden_in.1", "hidden.1"], grad=True)
    target = run.output[:, -1].sum()
    (g,) = torch.autograd.grad(target, run.cache["hidden_in.1"], retain_graph=True)
    with torch.no_grad():
        h1 = run.cache["hidden.1"]
        want = ((h1 > 0).float() * net.head.weight.sum(0)) @ net.layers[1].weight
        want[:, :-1] = 0
    close(g, want)
    # out[:, -1] depends on layer 0 only through hidden.0[pos=4], which the scale cut off
    target.backward()
    assert torch.all(net.layers[0].weight.grad == 0) and torch.all(net.layers[0].bias.grad == 0)
    # layer 1's input at pos 4 is relu(0) = 0, so its weight gets no gradient but its bias does
    assert torch.all(net.layers[1].weight.grad == 0)
    with torch.no_grad():
        close(net.layers[1].bias.grad, ((h1[:, -1] > 0).float() * net.head.weight.sum(0)).sum(0))


def test_patch_from_an_inference_cache_works_in_a_grad_run(toy, x, x_other):
    src = toy.capture(x_other, ["hidden.0", "hidden.1"])
    assert src["hidden.0"].is_inference()
    ivs = {"hidden.0[pos=1]": cp.Patch(src), "hidden.1": cp.Mean(src), "hidden.0[pos=3]": cp.Resample(src)}
    run = toy.run(x, ivs, grad=True)
    assert run.output.requires_grad
    run.output.sum().backward()
    assert toy.module.layers[0].weight.grad is not None
    close(run.output.detach(), toy.run(x, ivs).output)


class Gate(cp.Intervention):
    """Multiplies the activation by the source's: autograd must save the source for backward."""

    kind = "gate_test"

    def __init__(self, source):
        self.source = source

    @property
    def source_inputs(self):
        return self.source

    def apply(self, x, ctx):
        return x * ctx.select(ctx.require_source("Gate"))


def test_a_source_saved_for_backward_may_come_from_an_inference_cache(toy, x, x_other):
    src = toy.capture(x_other, "hidden.0")
    assert src["hidden.0"].is_inference()
    run = toy.run(x, {"hidden.0[pos=2]": Gate(src)}, capture="hidden.0", grad=True)
    run.output.sum().backward()
    h = toy.capture(x, "hidden.0")["hidden.0"]
    want = h.clone()
    want[:, 2] *= src["hidden.0"][:, 2]
    close(run.cache["hidden.0"].detach(), want)


def test_patch_from_inputs_in_a_grad_run(toy, x, x_other):
    run = toy.run(x, {"hidden.0[pos=1]": cp.Patch(x_other)}, grad=True)
    assert run.output.requires_grad
    close(run.output.detach(), toy.run(x, {"hidden.0[pos=1]": cp.Patch(toy.capture(x_other, "hidden.0"))}).output)


# ---------------------------------------------------------------- Patch sources


def test_patch_from_inputs_equals_patch_from_captured_cache(toy, x, x_other):
    cache = toy.capture(x_other, ["hidden.0", "hidden.1"])
    ivs_inputs = {"hidden.0[pos=1]": cp.Patch(x_other), "hidden.1[dim={0,2}]": cp.Patch({"x": x_other})}
    ivs_cache = {"hidden.0[pos=1]": cp.Patch(cache), "hidden.1[dim={0,2}]": cp.Patch(cache)}
    a = toy.run(x, ivs_inputs, capture="hidden.1")
    b = toy.run(x, ivs_cache, capture="hidden.1")
    assert torch.equal(a.output, b.output)
    assert torch.equal(a.cache["hidden.1"], b.cache["hidden.1"])


def test_patching_everything_from_the_clean_run_gives_the_clean_output(toy, x, x_other):
    clean = toy.run(x_other, capture="hidden.1")
    patched = toy.run(x, {"hidden.1": cp.Patch(clean.cache)})
    close(patched.output, clean.output)


def test_patch_source_with_one_row_broadcasts(toy, x, x_other):
    one = toy.capture(x_other[1:2], "hidden.0")
    run = toy.run(x, {"hidden.0[pos=2]": cp.Patch(one)}, capture="hidden.0")
    row = one["hidden.0"][0, 2]
    for b in range(3):
        assert torch.equal(run.cache["hidden.0"][b, 2], row)
    # the same from inputs with one row
    assert torch.equal(toy.run(x, {"hidden.0[pos=2]": cp.Patch(x_other[1:2])}).output, run.output)


def test_patch_source_with_n_rows_is_row_by_row(toy, x, x_other):
    src = toy.capture(x_other, "hidden.0")
    h = toy.run(x, {"hidden.0[pos=2]": cp.Patch(src)}, capture="hidden.0").cache["hidden.0"]
    assert torch.equal(h[:, 2], src["hidden.0"][:, 2])


def test_patch_source_with_wrong_row_count_names_site_and_counts(toy, x, x_other):
    src = toy.capture(x_other[:2], "hidden.0")
    with pytest.raises(cp.SiteError, match=r"Patch at hidden.0\[pos=2\]: the source has 2 rows but the target has 3"):
        toy.run(x, {"hidden.0[pos=2]": cp.Patch(src)})
    with pytest.raises(cp.SiteError, match="source has 2 rows but the target has 3"):
        toy.run(x, {"hidden.0[pos=2]": cp.Patch(x_other[:2])})


def test_patch_source_of_another_length_raises_clearly(toy, x):
    longer = torch.randn(3, 7, 4)
    with pytest.raises(cp.SiteError, match=r"source activation has shape \(3, 7, 4\).*\(3, 5, 4\).*same length"):
        toy.run(x, {"hidden.0[pos=1]": cp.Patch(toy.capture(longer, "hidden.0"))})
    with pytest.raises(cp.SiteError, match="same length"):
        toy.run(x, {"hidden.0[pos=1]": cp.Patch(longer)})


def test_patch_cache_missing_the_site_names_what_it_holds(toy, x):
    cache = toy.capture(x, "hidden.1")
    with pytest.raises(cp.SiteError, match=r"no 'hidden.0' \(it holds hidden.1\)"):
        toy.run(x, {"hidden.0": cp.Patch(cache)})


def test_patch_without_source_raises(toy, x):
    with pytest.raises(cp.SiteError, match="no source activation"):
        toy.run(x, {"hidden.0": cp.Patch()})


# ---------------------------------------------------------------- site errors


def test_pattern_site_in_run_raises(toy, x):
    with pytest.raises(cp.SiteError, match="pattern"):
        toy.run(x, {"hidden.*": cp.Zero()})
    with pytest.raises(cp.SiteError, match="pattern"):
        toy.run(x, {"hidden.0[pos=*]": cp.Zero()})


def test_non_writable_family_raises(toy, x):
    base = type(toy.adapter)

    class ReadOnly(base):
        name = "toy_readonly"

        def catalog(self, model):
            fams = [dataclasses.replace(f, writable=(f.name != "hidden_in")) for f in super().catalog(model)]
            return Catalog(fams, "ToyNet")

    m = cp.WrappedModel(toy.module, ReadOnly())
    before = hook_state(toy.module)
    with pytest.raises(cp.SiteError, match="'hidden_in' can be captured but not intervened on"):
        m.run(x, {"hidden_in.1": cp.Zero()})
    assert hook_state(toy.module) == before
    # capturing it is fine
    close(m.capture(x, "hidden_in.1")["hidden_in.1"], hand(toy.module, x)[1]["hidden_in.1"])


def test_unknown_family_lists_families(toy, x):
    with pytest.raises(cp.SiteError, match="no site family 'hiden'.*Did you mean 'hidden'.*hidden_in, hidden, out"):
        toy.run(x, {"hiden.0": cp.Zero()})
    with pytest.raises(cp.SiteError, match="Families: hidden_in, hidden, out"):
        toy.capture(x, "resid_post.0")


def test_non_intervention_value_raises_type_error(toy, x):
    with pytest.raises(TypeError, match="expected an Intervention"):
        toy.run(x, {"hidden.0": 0.0})


# ---------------------------------------------------------------- dtype and device


def test_float64_model_gives_float64_outputs_and_captures(toy, x, x_other):
    src32 = toy.capture(x_other, "hidden.0")  # float32 cache, patched into the float64 model
    toy.module.double()
    xd = x.double()
    assert toy.dtype == torch.float64 and toy.device == torch.device("cpu")
    ivs = {
        "hidden.0[pos=1]": cp.Patch(src32),
        "hidden.1": cp.Add(torch.ones(4, dtype=torch.float32)),
        "hidden_in.1[pos=0]": cp.Noise(seed=0),
        "out[pos=2]": cp.ProjectOut(torch.ones(3, dtype=torch.float32)),
    }
    run = toy.run(xd, ivs, capture=["hidden_in.*", "hidden.*", "out"])
    assert run.output.dtype == torch.float64
    assert {v.dtype for v in run.cache.values()} == {torch.float64}
    assert all(v.device.type == "cpu" for v in run.cache.values())
    plain = toy.run(xd, capture="hidden.0")
    close(plain.output, hand(toy.module, xd)[0], rtol=1e-12, atol=1e-12)


def test_cache_selection_is_checked_like_a_run(toy, x):
    cache = toy.capture(x, "hidden.0")
    assert cache["hidden.0[pos=-1]"].shape == (x.shape[0], 1, 4)
    assert torch.equal(cache["hidden.0[pos={0,2},dim={1,3}]"], cache["hidden.0"][:, [0, 2]][:, :, [1, 3]])
    with pytest.raises(cp.SiteError, match="out of range"):
        cache[f"hidden.0[pos={x.shape[1]}]"]
    with pytest.raises(cp.SiteError, match="not \\['head'\\]"):
        cache["hidden.0[head=1]"]


# ---------------------------------------------------------------- no silent no-ops


@pytest.mark.parametrize("site", ["hidden.1[pos=100:200]", "hidden.1[pos=4:2]", "hidden.1[pos=5:]",
                                  "hidden.1[pos=-4:0]", "hidden.1[pos=2:9]", "hidden.1[pos=-6:]"])
def test_an_empty_or_out_of_range_range_is_a_site_error_naming_the_length(toy, x, site):
    before = hook_state(toy.module)
    with pytest.raises(cp.SiteError, match=r"axis 'pos' of size 5 \(the inputs' length\)") as info:
        toy.run(x, {site: cp.Zero()})
    assert site in str(info.value)
    with pytest.raises(cp.SiteError, match="size 5"):
        toy.capture(x, "hidden.1")[site]
    assert hook_state(toy.module) == before


@pytest.mark.parametrize("site", ["resid_post.1[pos=100:200]", "resid_post.1[pos=5:2]", "resid_post.1[pos=10:]",
                                  "attn_pattern.1[key_pos=-4:0]"])
def test_gpt2_empty_ranges_are_refused(gpt2, ids, site):
    m = cp.wrap(gpt2)
    before = hook_state(gpt2)
    with pytest.raises(cp.SiteError, match=r"of size 10 \(the inputs' length\)"):
        m.run(ids, {site: cp.Zero()})
    assert hook_state(gpt2) == before


# ---------------------------------------------------------------- positions with padding: last and -1


def masked_toy():
    """The toy net with an adapter that keeps an attention mask (the net itself ignores it)."""
    from conftest import ToyNet, toy_adapter

    class MaskedToyAdapter(type(toy_adapter())):
        name = "toy_masked"

        def prepare(self, model, inputs):
            out = super().prepare(model, inputs)
            if isinstance(inputs, dict) and "attention_mask" in inputs:
                out["attention_mask"] = inputs["attention_mask"]
            return out

    return cp.wrap(ToyNet().eval(), MaskedToyAdapter())


def _mask(pad: str | None, rows: int = 3, length: int = 5) -> torch.Tensor:
    mask = torch.ones(rows, length, dtype=torch.long)
    if pad == "right":
        mask[0, 3:] = 0  # row 0 ends at position 2
        mask[2, 4:] = 0  # row 2 at 3
    elif pad == "left":
        mask[1, :2] = 0
    return mask


def _lasts(mask: torch.Tensor) -> list[int]:
    return [int(row.nonzero().max()) for row in mask]


def per_row(edit_row):
    """An edit of a full activation that calls ``edit_row(v, r)`` for every row."""

    def edit(v):
        for r in range(v.shape[0]):
            edit_row(v, r)
        return v

    return edit


@pytest.mark.parametrize("pad", [None, "right", "left"])
def test_last_is_each_rows_last_real_token(x, pad):
    m, mask = masked_toy(), _mask(pad)
    lasts = _lasts(mask)
    run = m.run({"x": x, "attention_mask": mask}, {"hidden.0[pos=last,dim=1]": cp.Scale(3.0)}, capture="hidden.0")

    def edit(v, r):
        v[r, lasts[r], 1] *= 3.0

    expected, acts = hand(m.module, x, {"hidden.0": per_row(edit)})
    close(run.output, expected)
    got = run.cache["hidden.0[pos=last]"]
    assert got.shape == (3, 1, 4)
    close(got[:, 0], torch.stack([acts["hidden.0"][r, lasts[r]] for r in range(3)]))


@pytest.mark.parametrize("site", ["hidden.0[pos=-1]", "hidden.0[pos=-2:]", "hidden.0[pos={-1,0}]", "hidden.0[pos=:-1]"])
def test_a_negative_position_on_right_padding_is_refused(x, site):
    m, mask = masked_toy(), _mask("right")
    before = hook_state(m.module)
    inputs = {"x": x, "attention_mask": mask}
    with pytest.raises(cp.SiteError, match="padded on the right") as info:
        m.run(inputs, {site: cp.Zero()})
    message = str(info.value)
    assert site in message and "row 0 at 2, row 2 at 3" in message and "pos=last" in message
    assert hook_state(m.module) == before
    cache = m.capture(inputs, "hidden.0")  # capturing is fine; selecting from it is checked the same way
    with pytest.raises(cp.SiteError, match="padded on the right"):
        cache[site]
    m.run(inputs, {"hidden.0[pos=2]": cp.Zero()})  # columns counted from the start are columns


def test_with_left_padding_minus_one_and_last_agree(x):
    m, mask = masked_toy(), _mask("left")
    inputs = {"x": x, "attention_mask": mask}
    a = m.run(inputs, {"hidden.1[pos=-1]": cp.Zero()}).output
    b = m.run(inputs, {"hidden.1[pos=last]": cp.Zero()}).output
    assert torch.equal(a, b)


def test_last_patch_reads_each_source_rows_own_last_token(x, x_other):
    m = masked_toy()
    right, left = _mask("right"), _mask("left")
    source = m.capture({"x": x_other, "attention_mask": right}, "hidden.1")
    assert torch.equal(source.attention_mask, right)
    run = m.run({"x": x, "attention_mask": left}, {"hidden.1[pos=last]": cp.Patch(source)})
    src = hand(m.module, x_other)[1]["hidden.1"]
    to, frm = _lasts(left), _lasts(right)

    def edit(v, r):
        v[r, to[r]] = src[r, frm[r]]

    close(run.output, hand(m.module, x, {"hidden.1": per_row(edit)})[0])
    from_inputs = m.run({"x": x, "attention_mask": left},
                        {"hidden.1[pos=last]": cp.Patch({"x": x_other, "attention_mask": right})})
    assert torch.equal(from_inputs.output, run.output)


def test_last_on_bound_rows_uses_those_rows_masks(x):
    m, mask = masked_toy(), _mask("right")
    inputs = {"x": x, "attention_mask": mask}
    run = m.run(inputs, [cp.Bound(cp.Site.parse("hidden.0[pos=last]"), cp.Zero(), rows=slice(0, 1)),
                         cp.Bound(cp.Site.parse("hidden.0[pos=last]"), cp.Scale(2.0), rows=slice(2, 3))])
    lasts = _lasts(mask)

    def edit(v, r):
        if r == 0:
            v[r, lasts[r]] = 0
        elif r == 2:
            v[r, lasts[r]] *= 2

    close(run.output, hand(m.module, x, {"hidden.0": per_row(edit)})[0])


def test_last_in_a_grad_run_cuts_exactly_the_written_tokens_from_the_graph(x):
    m, mask = masked_toy(), _mask("right")
    leaf = x.clone().requires_grad_(True)
    run = m.run({"x": leaf, "attention_mask": mask}, {"hidden.0[pos=last]": cp.Scale(0.0)}, grad=True)
    run.output.sum().backward()
    lasts = _lasts(mask)
    cut = torch.zeros(3, 5, dtype=torch.bool)
    cut[torch.arange(3), torch.tensor(lasts)] = True
    assert torch.all(leaf.grad[cut] == 0)  # the toy keeps positions apart: a zeroed token has no gradient
    assert torch.all(leaf.grad[~cut].abs().sum(-1) > 0)


def test_the_cache_keeps_its_mask_through_to_detach_and_to_dict(x):
    m, mask = masked_toy(), _mask("right")
    cache = m.capture({"x": x, "attention_mask": mask}, "hidden.0")
    for copy in (cache.to(torch.float64), cache.detach(), cp.Cache.from_dict(cache.to_dict())):
        assert torch.equal(copy.attention_mask, mask)
        close(copy["hidden.0[pos=last]"].to(torch.float32), cache["hidden.0[pos=last]"])
    assert cp.Cache(dict(cache), cache.axes)["hidden.0[pos=last]"].shape == (3, 1, 4)  # no mask: last column


def test_last_on_an_axis_the_mask_does_not_cover_is_refused(x):
    m = masked_toy()
    with pytest.raises(cp.SiteError, match="mask, which has 7 columns, but axis 'pos' has 5"):
        m.run({"x": x, "attention_mask": torch.ones(3, 7, dtype=torch.long)}, {"hidden.0[pos=last]": cp.Zero()})
    with pytest.raises(cp.SiteError, match=r"rows \[1\] have no real token"):
        m.run({"x": x, "attention_mask": torch.tensor([[1] * 5, [0] * 5, [1] * 5])}, {"hidden.0[pos=last]": cp.Zero()})


def _tiny(kind):
    from conftest import tiny_gpt2, tiny_llama

    return tiny_gpt2() if kind == "gpt2" else tiny_llama()


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("pad", ["right", "left"])
def test_transformers_last_is_the_token_the_metrics_read(kind, pad):
    from conftest import padded_prompts

    m = cp.wrap(_tiny(kind))
    inputs = padded_prompts(4, pad=pad)
    lasts = _lasts(inputs["attention_mask"])
    # the metric's position -1 is each row's last real token: the same one pos=last names
    metric = cp.metrics.logit_diff(3, 5)
    run = m.run(inputs, capture="logits")
    ctx = cp.metrics.MetricContext(torch.arange(3), None, inputs["attention_mask"])
    logits = run.cache["logits[pos=last]"][:, 0]
    close(metric(run.output, ctx), logits[:, 3] - logits[:, 5])
    # an edit at pos=last is an edit at each row's last real token, as a hand-written hook makes it
    block = m.module.transformer.h[0] if kind == "gpt2" else m.module.model.layers[0]

    def hook(module, args, output):
        hidden = (output[0] if isinstance(output, tuple) else output).clone()
        for r, p in enumerate(lasts):
            hidden[r, p] = 0
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = block.register_forward_hook(hook)
    try:
        with torch.no_grad():
            expected = m.module(**inputs).logits
    finally:
        handle.remove()
    got = m.run(inputs, {"resid_post.0[pos=last]": cp.Zero()}).output
    close(got, expected)
    if pad == "left":  # the last column is every row's last token
        assert torch.equal(m.run(inputs, {"resid_post.0[pos=-1]": cp.Zero()}).output, got)
    else:
        with pytest.raises(cp.SiteError, match="padded on the right"):
            m.run(inputs, {"resid_post.0[pos=-1]": cp.Zero()})


def test_activation_patching_at_last_on_right_padded_prompts(gpt2):
    from conftest import padded_prompts

    m = cp.wrap(gpt2)
    clean, corrupt = padded_prompts(5, pad="right"), padded_prompts(6, pad="right")
    metric = cp.metrics.logit_diff(3, 5)
    res = cp.activation_patching(m, clean, corrupt, "resid_pre.*[pos=last]", metric, progress=False)
    clean_cache = m.capture(clean, "resid_pre.*")
    ctx = cp.metrics.MetricContext(torch.arange(3), None, corrupt["attention_mask"])
    base = metric(m.run(corrupt).output, ctx)
    for layer in range(2):
        out = m.run(corrupt, {f"resid_pre.{layer}[pos=last]": cp.Patch(clean_cache)}).output
        assert res.values[layer] == pytest.approx(float((metric(out, ctx) - base).double().mean()), abs=1e-5)
    with pytest.raises(cp.SiteError, match="padded on the right"):
        cp.activation_patching(m, clean, corrupt, "resid_pre.*[pos=-1]", metric, progress=False)


def test_last_from_a_cache_without_a_mask_into_right_padded_rows_is_refused(x, x_other):
    m = masked_toy()
    source = m.capture({"x": x_other, "attention_mask": _mask("right")}, "hidden.1")
    bare = cp.Cache(dict(source), source.axes)  # e.g. rows cut out by hand: the mask is gone
    with pytest.raises(cp.SiteError, match="source cache keeps no attention mask"):
        m.run({"x": x, "attention_mask": _mask("right")}, {"hidden.1[pos=last]": cp.Patch(bare)})
    m.run({"x": x, "attention_mask": _mask("left")}, {"hidden.1[pos=last]": cp.Patch(bare)})  # last columns


def test_a_set_naming_one_index_twice_selects_it_once(toy, x):
    cache = toy.capture(x, "hidden.0")
    assert torch.equal(cache["hidden.0[pos={0,-5}]"], cache["hidden.0[pos=0]"])
    run = toy.run(x, {"hidden.0[pos={0,-5}]": cp.Add(torch.tensor(1.0))}, capture="hidden.0")
    close(run.cache["hidden.0"], cache["hidden.0"] + torch.eye(5)[0].view(1, 5, 1))
