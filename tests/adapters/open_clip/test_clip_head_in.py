"""Receiver-input sites of both CLIP towers (head_in, mlp_in, logits_in, and head_z) on open_clip and
HuggingFace CLIPModel: capture, self-patch, one head's write from another input, the readout by hand,
head_in gradients against autograd through the write path, and parity between the libraries."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import crosspatch as cp
from clip_models import images, texts, tiny_open_clip
from crosspatch.adapters.open_clip import to_transformers
from crosspatch.engine.interventions import Patch, Set
from crosspatch.methods.attribution import _Tap

TOWERS = ("vision", "text")
LIBS = ("open_clip", "hf")
NEW = ("head_in", "mlp_in", "logits_in", "head_z")
EMBED = {"vision": "image_embed", "text": "text_embed"}


@pytest.fixture(scope="module")
def pair():
    model = tiny_open_clip()
    return {"open_clip": cp.wrap(model), "hf": cp.wrap(to_transformers(model))}


def inputs(tower: str, seed: int = 0) -> dict:
    """Both towers run; ``tower``'s inputs are the rows (so its sites are bound per row)."""
    return {"images": images(3, seed=seed), "texts": texts(3, seed=seed), "rows": "texts" if tower == "text" else "images"}


def test_families_sit_in_forward_order_on_both_libraries(pair):
    for m in pair.values():
        names = [f.name for f in m.catalog]
        for t in TOWERS:
            after = {"head_in": "resid_pre", "head_z": "attn_pattern", "mlp_in": "resid_mid", "logits_in": "resid_post"}
            for fam, prev in after.items():
                assert names.index(f"{t}.{fam}") == names.index(f"{t}.{prev}") + 1, (t, fam, names)
            head_in = m.catalog.family(f"{t}.head_in")
            assert head_in.axis_names == ("pos", "qkv", "head", "dim") and head_in.layers == 2
            assert m.catalog.family(f"{t}.logits_in").layers is None
            assert m.catalog.family(f"{t}.head_out").linear_from.source == f"{t}.head_z"


@pytest.mark.parametrize("lib", LIBS)
@pytest.mark.parametrize("tower", TOWERS)
def test_capture_is_what_the_modules_read(pair, lib, tower):
    m, t = pair[lib], tower
    cache = m.capture(inputs(t), [f"{t}.{f}" for f in ("head_in.*", "mlp_in.*", "logits_in", "resid_pre.*", "resid_mid.*",
                                                      "resid_post.*")])
    for layer in range(2):
        pre, head_in = cache[f"{t}.resid_pre.{layer}"], cache[f"{t}.head_in.{layer}"]
        assert head_in.shape == (*pre.shape[:2], 3, 4, 32)
        assert torch.equal(head_in, pre[:, :, None, None, :].expand_as(head_in))
        assert torch.equal(cache[f"{t}.mlp_in.{layer}"], cache[f"{t}.resid_mid.{layer}"])
    assert torch.equal(cache[f"{t}.logits_in"], cache[f"{t}.resid_post.1"])


@pytest.mark.parametrize("lib", LIBS)
@pytest.mark.parametrize("tower", TOWERS)
def test_self_patch_is_exact(pair, lib, tower):
    m, t, x = pair[lib], tower, inputs(tower)
    plain = m.run(x).output
    cache = m.capture(x, [f"{t}.head_in.*", f"{t}.mlp_in.*", f"{t}.logits_in"])
    sites = {f"{t}.head_in.1[qkv=0,head=2]": Patch(cache), f"{t}.head_in.0": Patch(cache), f"{t}.mlp_in.1": Patch(cache),
             f"{t}.logits_in[pos=3]": Patch(cache)}
    assert torch.equal(m.run(x, sites).output, plain)
    # a copy (not the captured tensor itself) takes the comparing path, still bit for bit
    copies = cp.Cache({k: v.clone() for k, v in cache.items()}, dict(cache.axes))
    every = {f"{t}.{f}.{layer}": Patch(copies) for f in ("head_in", "mlp_in") for layer in range(2)}
    assert torch.equal(m.run(x, every).output, plain)


@pytest.mark.parametrize("lib", LIBS)
@pytest.mark.parametrize("tower", TOWERS)
def test_one_heads_inputs_from_another_input_give_that_heads_write(pair, lib, tower):
    m, t = pair[lib], tower
    clean, source = inputs(t, seed=1), inputs(t, seed=2)
    read = [f"{t}.head_out.1", f"{t}.resid_pre.1"]
    base = m.capture(clean, read)
    src = m.capture(source, [f"{t}.head_in.1", *read])
    run = m.run(clean, {f"{t}.head_in.1[head=2]": Patch(src)}, capture=read)
    got = run.cache[f"{t}.head_out.1"]
    # the patched head is recomputed per slot (norm + its projection columns), not by the fused kernel: 1e-5
    torch.testing.assert_close(got[:, :, 2], src[f"{t}.head_out.1"][:, :, 2], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got[:, :, 2], base[f"{t}.head_out.1"][:, :, 2], atol=1e-2)
    others = [0, 1, 3]
    assert torch.equal(got[:, :, others], base[f"{t}.head_out.1"][:, :, others])  # the other heads' columns are kept
    assert torch.equal(run.cache[f"{t}.resid_pre.1"], base[f"{t}.resid_pre.1"])  # the residual itself is untouched
    # the query alone from the source: the head reads its keys and values from the clean run, so it differs
    q_only = m.run(clean, {f"{t}.head_in.1[qkv=0,head=2]": Patch(src)}, capture=read).cache[f"{t}.head_out.1"]
    assert not torch.allclose(q_only[:, :, 2], src[f"{t}.head_out.1"][:, :, 2], atol=1e-2)
    assert torch.equal(q_only[:, :, others], base[f"{t}.head_out.1"][:, :, others])


@pytest.mark.parametrize("lib", LIBS)
@pytest.mark.parametrize("tower", TOWERS)
def test_mlp_in_moves_the_mlp_only(pair, lib, tower):
    m, t, x = pair[lib], tower, inputs(tower)
    read = [f"{t}.mlp_out.0", f"{t}.resid_mid.0", f"{t}.resid_post.0"]
    base = m.capture(x, read)
    run = m.run(x, {f"{t}.mlp_in.0": Set(0.0)}, capture=read)
    assert torch.equal(run.cache[f"{t}.resid_mid.0"], base[f"{t}.resid_mid.0"])
    torch.testing.assert_close(run.cache[f"{t}.resid_post.0"], base[f"{t}.resid_mid.0"] + run.cache[f"{t}.mlp_out.0"])
    mlp_of_zero = run.cache[f"{t}.mlp_out.0"][0, 0]
    assert torch.allclose(run.cache[f"{t}.mlp_out.0"], mlp_of_zero.expand_as(run.cache[f"{t}.mlp_out.0"]))
    assert not torch.allclose(mlp_of_zero, base[f"{t}.mlp_out.0"][0, 0])


def _readout(module: torch.nn.Module, lib: str, tower: str, v: torch.Tensor) -> torch.Tensor:
    """The tower's embedding of a pooled residual ``v`` ``[n, d]``, with the library's own modules."""
    if lib == "open_clip":
        if tower == "vision":
            return module.visual.ln_post(v) @ module.visual.proj
        return module.ln_final(v) @ module.text_projection
    if tower == "vision":
        return module.visual_projection(module.vision_model.post_layernorm(v))
    return module.text_projection(module.text_model.final_layer_norm(v))


@pytest.mark.parametrize("lib", LIBS)
@pytest.mark.parametrize("tower", TOWERS)
def test_logits_in_is_what_the_readout_pools(pair, lib, tower):
    """vision: position 0 (the class token) is pooled; text: the end-of-text position (7 in these captions)."""
    m, t = pair[lib], tower
    x = {"images": images(2)} if t == "vision" else {"texts": texts(2)}
    pooled, other = (0, 2) if t == "vision" else (7, 3)
    plain = m.run(x).output
    v = torch.randn(2, 32, generator=torch.Generator().manual_seed(9))
    cache = m.capture(x, f"{t}.logits_in")
    edited = cache[f"{t}.logits_in"].clone()
    edited[:, pooled] = v
    key = f"{t}.logits_in"
    out = m.run(x, {f"{key}[pos={pooled}]": Patch(cp.Cache({key: edited}, {key: cache.axes[key]}))})
    with torch.no_grad():
        expected = _readout(m.module, lib, t, v)
    torch.testing.assert_close(out.output, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out.output, plain, atol=1e-3)
    # a position the readout does not pool changes nothing
    assert torch.equal(m.run(x, {f"{t}.logits_in[pos={other}]": Set(0.0)}).output, plain)


@pytest.fixture(scope="module")
def double_pair():
    model = tiny_open_clip(seed=1, dtype=torch.float64)
    return {"open_clip": cp.wrap(model), "hf": cp.wrap(to_transformers(model).double())}


@pytest.mark.parametrize("lib", LIBS)
@pytest.mark.parametrize("tower", TOWERS)
def test_head_in_gradient_matches_the_exact_write_path(double_pair, lib, tower):
    """The per-slot gradient (slot_grad.py) against autograd through the recomputation a changed slot takes."""
    m, t = double_pair[lib], tower
    x = {"images": images(2)} if t == "vision" else {"texts": texts(2)}

    def metric(out):
        return (out[:, 0] * out[:, 3]).sum()

    tap = _Tap()
    (grad,) = torch.autograd.grad(metric(m.run(x, {f"{t}.head_in.1": tap}, grad=True).output), [tap.delta])
    base = m.capture(x, f"{t}.head_in.1")[f"{t}.head_in.1"]
    gen = torch.Generator().manual_seed(6)
    for role, head in [(0, 1), (1, 3), (2, 0)]:
        edited = base.clone()
        edited[:, :, role, head] += 1e-9 * torch.randn(edited[:, :, role, head].shape, generator=gen, dtype=torch.float64)
        edited.requires_grad_(True)
        cache = cp.Cache({f"{t}.head_in.1": edited}, {f"{t}.head_in.1": ()})
        value = metric(m.run(x, {f"{t}.head_in.1[qkv={role},head={head}]": Patch(cache)}, grad=True).output)
        (exact,) = torch.autograd.grad(value, [edited])
        assert exact[:, :, role, head].abs().max() > 1e-4
        torch.testing.assert_close(grad[:, :, role, head], exact[:, :, role, head], rtol=1e-6, atol=1e-9)


def test_head_in_gradients_agree_between_libraries(double_pair):
    x = {"images": images(2), "texts": texts(3)}
    grads = []
    for m in double_pair.values():
        taps = {f"{t}.head_in.{layer}": _Tap() for t in TOWERS for layer in range(2)}
        out = m.run(x, taps, grad=True).output
        grads.append(torch.autograd.grad(out[:, 1].sum() - out[:, 2].sum(), [tap.delta for tap in taps.values()]))
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, atol=1e-10, rtol=1e-8)
        assert a.abs().max() > 1e-4


def test_new_families_agree_between_libraries(pair):
    x = {"images": images(3), "texts": texts(4)}
    sites = [f"{t}.{f}" + ("" if f == "logits_in" else ".*") for t in TOWERS for f in NEW]
    a, b = pair["open_clip"].run(x, capture=sites).cache, pair["hf"].run(x, capture=sites).cache
    assert list(a) == list(b) and len(a) == 2 * (3 * 2 + 1)
    for key in a:
        # float32, different kernels (fused in_proj against separate q/k/v; sharpened attention amplifies
        # rounding at padding positions, up to ~4e-6 of the scale): 1e-5 of the values' scale; double agrees to 1e-11
        scale = float(a[key].abs().max())
        torch.testing.assert_close(b[key], a[key], atol=1e-5 * scale, rtol=1e-5, msg=key)


def test_new_families_agree_between_libraries_in_double(double_pair):
    x = {"images": images(3), "texts": texts(4)}
    sites = [f"{t}.{f}" + ("" if f == "logits_in" else ".*") for t in TOWERS for f in NEW]
    a, b = double_pair["open_clip"].run(x, capture=sites).cache, double_pair["hf"].run(x, capture=sites).cache
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-11, rtol=1e-11, msg=key)


@pytest.mark.parametrize("tower", TOWERS)
def test_atp_on_head_in_agrees_between_libraries(pair, tower):
    from crosspatch.methods.attribution import attribution_patching

    clean, corrupt = inputs(tower, seed=1), inputs(tower, seed=2)
    res = [attribution_patching(pair[lib], clean, corrupt, f"{tower}.head_in.*[qkv=*,head=*]", lambda out: out[:, 0] - out[:, 1])
           for lib in LIBS]
    a, b = (np.asarray(r.values, dtype=np.float64) for r in res)
    assert a.shape == (2, 3, 4) and np.abs(a).max() > 1e-2
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * np.abs(a).max())


@pytest.mark.parametrize("tower", TOWERS)
def test_atp_star_switches_work_per_tower(pair, tower):
    """qk_fix corrects the tower's query/key slots (and agrees between libraries); GradDrop groups that
    tower's layers. Value slots keep plain AtP under qk_fix."""
    from crosspatch.methods.attribution import attribution_patching

    clean, corrupt = inputs(tower, seed=1), inputs(tower, seed=2)
    metric = lambda out: out[:, 0] - out[:, 1]  # noqa: E731
    sites = f"{tower}.head_in.*[qkv=*,head=*]"
    fixed = [attribution_patching(pair[lib], clean, corrupt, sites, metric, qk_fix=True) for lib in LIBS]
    plain = attribution_patching(pair["open_clip"], clean, corrupt, sites, metric)
    a, b = (np.asarray(r.values, dtype=np.float64) for r in fixed)
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * np.abs(a).max())
    np.testing.assert_allclose(a[:, 2], plain.values[:, 2], rtol=1e-6, atol=1e-9)  # values: no correction
    assert not np.allclose(a[:, :2], plain.values[:, :2], rtol=1e-3)  # queries and keys: corrected
    drop = attribution_patching(pair["open_clip"], clean, corrupt, f"{tower}.head_out.*[head=*]", metric, grad_drop=True)
    assert drop.metadata["grad_drop_groups"] == [[f"{tower}.attn_out.{l}", f"{tower}.mlp_out.{l}"] for l in range(2)]
