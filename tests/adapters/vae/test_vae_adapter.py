"""The VAE adapter against diffusers' own encode / decode and against hand-edited latents."""

from __future__ import annotations

import io

import pytest
import torch

import crosspatch as cp
from crosspatch.engine.adapter import AdapterError
from crosspatch.adapters.vae import ConvVAE, VAEAdapter
from crosspatch.adapters.vae.reaches import _POINTS
from crosspatch.engine.interventions import Set
from vae_helpers import images, tiny_kl

close = torch.testing.assert_close

DIFFUSERS_FAMILIES = [
    "encoder.block", "encoder.mid.head_out", "encoder.mid.attn_out", "encoder.mid", "latent.mu", "latent.logvar",
    "latent.z", "decoder.mid.head_out", "decoder.mid.attn_out", "decoder.mid", "decoder.block", "recon",
]


@pytest.fixture(scope="module")
def kl():
    return tiny_kl()


@pytest.fixture(scope="module")
def conv():
    torch.manual_seed(0)
    return ConvVAE(latent_dim=6).eval()


def hooks_of(module: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


# ------------------------------------------------------------------ catalog


def test_catalogs(kl, conv):
    m = cp.wrap(kl)
    assert isinstance(m.adapter, VAEAdapter)
    assert list(m.sites().families) == DIFFUSERS_FAMILIES
    assert m.sites().family("encoder.block").layers == 2
    assert m.sites().family("latent.z").axis_names == ("dim", "h", "w")
    assert m.sites().family("latent.z").axis("dim").size == 3
    assert m.sites().family("encoder.mid.head_out").axis_names == ("head", "channel", "h", "w")
    c = cp.wrap(conv)
    assert list(c.sites().families) == ["encoder.block", "latent.mu", "latent.logvar", "latent.z", "decoder.block", "recon"]
    assert c.sites().family("latent.z").axis_names == ("dim",)
    assert c.describe()["kind"] == "torch" and m.describe()["kind"] == "diffusers"


def test_no_attention_no_head_sites():
    m = cp.wrap(tiny_kl(mid_block_add_attention=False))
    assert "encoder.mid.head_out" not in m.sites() and "decoder.mid.attn_out" not in m.sites()
    assert m.run(images()).output.shape == (3, 3, 16, 16)


# ------------------------------------------------------------------ posterior and latent writes


def test_posterior_sites_equal_diffusers(kl):
    x = images()
    cache = cp.wrap(kl).capture(x, ["latent.mu", "latent.logvar", "latent.z", "recon"])
    with torch.no_grad():
        posterior = kl.encode(x).latent_dist
        recon = kl.decode(posterior.mean).sample
    close(cache["latent.mu"], posterior.mean)
    close(cache["latent.logvar"], posterior.logvar)
    close(cache["latent.z"], posterior.mean)  # z = mean by default
    close(cache["recon"], recon)


@pytest.mark.parametrize("which", ["kl", "conv"])
def test_set_latent_equals_decoding_edited_z(which, kl, conv):
    model, x = (kl, images()) if which == "kl" else (conv, images(size=32))
    m = cp.wrap(model)
    with torch.no_grad():
        z = model.encode(x).latent_dist.mean if which == "kl" else model.encode(x)[0]
        edited = z.clone()
        edited[:, 1] = 1.7
        want = model.decode(edited).sample if which == "kl" else model.decode(edited)
    close(m.run(x, {"latent.z[dim=1]": Set(1.7)}).output, want)
    # writing latent.mu moves z, since z = mu
    run = m.run(x, {"latent.mu[dim=1]": Set(1.7)}, capture="latent.z")
    close(run.cache["latent.z"], edited)
    close(run.output, want)


def test_add_shifts_one_latent(kl):
    x = images()
    m = cp.wrap(kl)
    z = m.capture(x, "latent.z")["latent.z"]
    shifted = z.clone()
    shifted[:, 2] += 0.5
    with torch.no_grad():
        want = kl.decode(shifted).sample
    close(m.run(x, {"latent.z[dim=2]": cp.Add(0.5)}).output, want)


def test_interchange_all_latents_reproduces_source(kl, conv):
    for model, x in ((kl, images()), (conv, images(size=32))):
        m = cp.wrap(model)
        source = images(n=3, size=x.shape[-1], seed=9)
        src = m.run(source, capture="latent.z")
        close(m.run(x, {"latent.z": cp.Patch(src.cache)}).output, src.output)
        dims = ",".join(str(i) for i in range(m.sites().family("latent.z").axis("dim").size))
        close(m.run(x, {f"latent.z[dim={{{dims}}}]": cp.Patch(source)}).output, src.output)


def test_self_patch_changes_nothing(kl, conv):
    for model, x in ((kl, images()), (conv, images(size=32))):
        m = cp.wrap(model)
        keys = m.capture_keys([f"{f.name}.*" if f.layers else f.name for f in m.sites()])
        clean = m.run(x, capture=keys)
        assert len(keys) == (14 if model is kl else 10)
        for key in keys:
            out = m.run(x, {key: cp.Patch(clean.cache)}).output
            assert torch.equal(out, clean.output), key


def test_latent_writes_are_exact_in_float64():
    vae = tiny_kl().double()
    x = images(dtype=torch.float64)
    m = cp.wrap(vae)
    out = m.run(x, {"latent.z[dim=0]": Set(0.25)})
    assert out.output.dtype == torch.float64
    z = m.capture(x, "latent.z")["latent.z"].clone()
    z[:, 0] = 0.25
    with torch.no_grad():
        close(out.output, vae.decode(z).sample, rtol=0, atol=1e-12)


# ------------------------------------------------------------------ decode-only runs


def test_decode_only_fires_decoder_sites(kl):
    m = cp.wrap(kl)
    z = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    run = m.run({"latents": z}, capture=["latent.z", "decoder.mid.head_out", "decoder.mid", "decoder.block.*", "recon"])
    with torch.no_grad():
        want = kl.decode(z).sample
    close(run.output, want)
    close(run.cache["latent.z"], z)
    close(run.cache["recon"], want)
    assert run.cache["decoder.block.1"].shape == (2, 8, 16, 16)
    edited = z.clone()
    edited[:, 0] = -1.0
    with torch.no_grad():
        close(m.run({"latents": z}, {"latent.z[dim=0]": Set(-1.0)}).output, kl.decode(edited).sample)
    with pytest.raises(cp.SiteError, match="never reached"):
        m.run({"latents": z}, capture="latent.mu")


def test_decode_only_protocol(conv):
    m = cp.wrap(conv)
    z = torch.randn(4, 6, generator=torch.Generator().manual_seed(4))
    run = m.run({"latents": z}, capture=["latent.z", "decoder.block.*", "recon"])
    with torch.no_grad():
        close(run.output, conv.decode(z))
    close(run.cache["latent.z"], z)
    assert run.cache["decoder.block.0"].shape == (4, 32, 8, 8)


# ------------------------------------------------------------------ configs and settings


@pytest.mark.parametrize("flags", [dict(use_quant_conv=False), dict(use_post_quant_conv=False),
                                   dict(use_quant_conv=False, use_post_quant_conv=False)])
def test_without_quant_convs(flags):
    vae = tiny_kl(**flags)
    assert (vae.quant_conv is None) == (not flags.get("use_quant_conv", True))
    x = images()
    m = cp.wrap(vae)
    cache = m.capture(x, ["latent.mu", "latent.logvar", "latent.z"])
    with torch.no_grad():
        posterior = vae.encode(x).latent_dist
        close(cache["latent.mu"], posterior.mean)
        close(cache["latent.logvar"], posterior.logvar)
        close(cache["latent.z"], posterior.mean)
        edited = posterior.mean.clone()
        edited[:, 2] = 0.9
        want = vae.decode(edited).sample
    close(m.run(x, {"latent.z[dim=2]": Set(0.9)}).output, want)
    close(m.run(x, {"latent.mu[dim=2]": Set(0.9)}).output, want)


def test_slicing_runs_unsliced_and_is_restored(kl):
    x = images(n=4)
    m = cp.wrap(kl)
    want = m.run(x, {"latent.z[dim=0]": Set(0.3)}, capture="latent.z")
    kl.enable_slicing()
    try:
        got = m.run(x, {"latent.z[dim=0]": Set(0.3)}, capture="latent.z")
        assert kl.use_slicing
    finally:
        kl.disable_slicing()
    close(got.output, want.output)
    assert got.cache["latent.z"].shape[0] == 4


def test_tiling_larger_than_a_tile_is_refused_by_name():
    vae = tiny_kl()
    vae.enable_tiling()
    m = cp.wrap(vae)
    assert m.run(images(size=16)).output.shape == (3, 3, 16, 16)  # no larger than a tile: untiled
    before = hooks_of(vae)
    with pytest.raises(AdapterError, match="use_tiling"):
        m.run(images(size=32), capture="latent.z")
    assert hooks_of(vae) == before


def test_sampled_z(kl, conv):
    x = images()
    m = cp.wrap(kl)
    a = m.run({"images": x, "sample_seed": 7}, capture=["latent.mu", "latent.logvar", "latent.z"]).cache
    b = m.run({"images": x, "sample_seed": 7}, capture="latent.z").cache
    assert torch.equal(a["latent.z"], b["latent.z"])
    eps = torch.randn((3, 3, 8, 8), generator=torch.Generator().manual_seed(7))
    std = torch.exp(0.5 * a["latent.logvar"].clamp(-30, 20))
    close(a["latent.z"], a["latent.mu"] + std * eps)
    c = cp.wrap(conv)
    x32 = images(size=32)
    noise = torch.randn(3, 6, generator=torch.Generator().manual_seed(1))
    cache = c.run({"images": x32, "noise": noise}, capture=["latent.mu", "latent.logvar", "latent.z"]).cache
    close(cache["latent.z"], cache["latent.mu"] + torch.exp(0.5 * cache["latent.logvar"]) * noise)


def test_input_errors(kl):
    m = cp.wrap(kl)
    with pytest.raises(ValueError, match="exactly one"):
        m.run({"images": images(), "latents": torch.zeros(3, 3, 8, 8)})
    with pytest.raises(ValueError, match="unknown VAE input"):
        m.run({"pixels": images()})
    with pytest.raises(ValueError, match="need 'images'"):
        m.run({"latents": torch.zeros(1, 3, 8, 8), "sample_seed": 1})


# ------------------------------------------------------------------ mid-block attention heads


def test_mid_heads_sum_to_attention_output():
    vae = tiny_kl()
    for side in ("encoder", "decoder"):
        getattr(vae, side).mid_block.attentions[0].heads = 2  # 16 channels as two heads of 8
    m = cp.wrap(vae)
    assert m.sites().family("decoder.mid.head_out").axis("head").size == 2
    x = images()
    seen = {}
    attn = vae.decoder.mid_block.attentions[0]
    handle = attn.register_forward_hook(lambda mod, args, out: seen.update(inp=args[0], out=out))
    try:
        cache = m.capture(x, ["encoder.mid.head_out", "encoder.mid.attn_out", "decoder.mid.head_out", "decoder.mid.attn_out"])
    finally:
        handle.remove()
    for side in ("encoder", "decoder"):
        bias = getattr(vae, side).mid_block.attentions[0].to_out[0].bias
        heads = cache[f"{side}.mid.head_out"]
        assert heads.shape[1:3] == (2, 16)
        close(heads.sum(dim=1) + bias[None, :, None, None], cache[f"{side}.mid.attn_out"])
    # the attention module's output is its projection plus the residual (rescale factor 1)
    close(cache["decoder.mid.attn_out"] + seen["inp"], seen["out"])
    # zeroing one head removes exactly its write
    run = m.run(x, {"decoder.mid.head_out[head=1]": cp.Zero()}, capture="decoder.mid.attn_out")
    close(run.cache["decoder.mid.attn_out"], cache["decoder.mid.attn_out"] - cache["decoder.mid.head_out"][:, 1])


# ------------------------------------------------------------------ hygiene


def test_runs_leave_no_hooks_or_points(kl, conv):
    for model, x in ((kl, images()), (conv, images(size=32))):
        m = cp.wrap(model)
        before = hooks_of(model)
        m.run(x, {"latent.z[dim=0]": Set(1.0)}, capture=["latent.mu", "recon", "decoder.block.*"])
        with pytest.raises(cp.SiteError):
            m.run(x, {"latent.z[dim=0]": Set(torch.ones(5))})  # does not broadcast
        assert hooks_of(model) == before
        assert model not in _POINTS


def test_set_serialises():
    iv = Set(2.5)
    assert iv.to_dict() == {"kind": "set", "value": 2.5}
    assert cp.intervention_from_dict(iv.to_dict()) == iv
    vec = Set(torch.arange(3.0))
    back = cp.intervention_from_dict(vec.to_dict())
    assert isinstance(back, Set) and torch.equal(back.value, vec.value)
    buf = io.BytesIO()  # the dict survives torch.save / torch.load(weights_only=True)
    torch.save(vec.to_dict(), buf)
    buf.seek(0)
    again = cp.intervention_from_dict(torch.load(buf, weights_only=True))
    assert torch.equal(again.value, vec.value)


def test_set_broadcasts_like_add_vector(conv):
    m = cp.wrap(conv)
    x = images(size=32)
    z = m.capture(x, "latent.z")["latent.z"]
    value = torch.arange(6.0)
    cache = m.run(x, {"latent.z[dim={1,4}]": Set(value)}, capture="latent.z").cache
    want = z.clone()
    want[:, [1, 4]] = value[[1, 4]]
    close(cache["latent.z"], want)
    with pytest.raises(cp.SiteError, match="no value"):
        m.run(x, {"latent.z": Set()})
