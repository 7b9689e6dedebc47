"""Sparse autoencoders: training, storage (also sae-lens folders) and feature interventions that keep the error."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import crosspatch as cp
from crosspatch.trainable.erasure import site_activations
from crosspatch.methods.sae_patching import SAEFeatures, sae_feature_ablation, sae_feature_patching
from crosspatch.trainable.sae import SAE, load_sae, train_sae


def _sparse_data(n=4000, d=16, atoms=32, active=3, seed=0):
    """Activations that are sparse sums of ``active`` of ``atoms`` unit directions."""
    g = torch.Generator().manual_seed(seed)
    dictionary = torch.randn(atoms, d, generator=g)
    dictionary = dictionary / dictionary.norm(dim=1, keepdim=True)
    codes = torch.zeros(n, atoms)
    idx = torch.stack([torch.randperm(atoms, generator=g)[:active] for _ in range(n)])
    codes.scatter_(1, idx, 1 + torch.rand(n, active, generator=g))
    return codes @ dictionary + 0.5


@pytest.fixture(scope="module")
def gpt2_sae():
    from conftest import tiny_gpt2

    torch.manual_seed(0)
    m = cp.wrap(tiny_gpt2())
    ids = torch.randint(2, 100, (160, 8), generator=torch.Generator().manual_seed(5))
    acts = site_activations(m, ids, "resid_post.0")  # [160 * 8, 64]
    sae = train_sae(acts, 128, kind="topk", k=16, steps=400, seed=0)
    return m, sae, acts


def test_topk_and_relu_training_on_planted_sparse_data():
    x = _sparse_data()
    topk = train_sae(x, 48, kind="topk", k=4, steps=600, seed=0)
    stats = topk.evaluate(x)
    assert stats["fvu"] < 0.15 and stats["l0"] <= 4, stats
    relu = train_sae(x, 48, kind="relu", l1=0.2, steps=600, seed=0)
    rstats = relu.evaluate(x)
    assert rstats["fvu"] < 0.2 and rstats["l0"] < 14, rstats
    again = train_sae(x, 48, kind="topk", k=4, steps=600, seed=0)
    assert torch.equal(again.W_dec, topk.W_dec)  # seeded
    assert topk.metadata["train"]["fvu"] == pytest.approx(stats["fvu"])


def test_trained_on_tiny_gpt2_site(gpt2_sae):
    _, sae, acts = gpt2_sae
    stats = sae.evaluate(acts)
    assert stats["fvu"] < 0.2 and stats["l0"] <= 16, stats


def test_save_load_roundtrip(gpt2_sae, tmp_path):
    _, sae, acts = gpt2_sae
    folder = sae.save(tmp_path / "sae")
    assert (folder / "cfg.json").is_file() and (folder / "sae_weights.safetensors").is_file()
    back = SAE.load(folder)
    assert back.kind == "topk" and back.k == 16 and back.d_sae == 128
    assert torch.equal(back(acts[:50]), sae(acts[:50]))


def _write_sae_lens(folder, cfg, weights):
    from safetensors.torch import save_file

    folder.mkdir()
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file(weights, str(folder / "sae_weights.safetensors"))


def test_load_sae_lens_folders(tmp_path):
    g = torch.Generator().manual_seed(0)
    d_in, d_sae = 8, 20
    w = {"W_enc": torch.randn(d_in, d_sae, generator=g), "W_dec": torch.randn(d_sae, d_in, generator=g),
         "b_enc": torch.randn(d_sae, generator=g), "b_dec": torch.randn(d_in, generator=g)}
    standard = {"architecture": "standard", "d_in": d_in, "d_sae": d_sae, "dtype": "float32", "device": "cpu",
                "apply_b_dec_to_input": True, "normalize_activations": "none",
                "hook_name": "blocks.0.hook_resid_post", "hook_layer": 0, "model_name": "gpt2",
                "context_size": 128, "prepend_bos": True, "dataset_path": "x", "sae_lens_training_version": "3.0"}
    _write_sae_lens(tmp_path / "standard", standard, w)
    sae = load_sae(tmp_path / "standard")
    x = torch.randn(5, d_in, generator=g)
    f = torch.relu((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"])
    torch.testing.assert_close(sae.encode(x), f)
    torch.testing.assert_close(sae(x), f @ w["W_dec"] + w["b_dec"])
    assert sae.metadata["hook_name"] == "blocks.0.hook_resid_post"
    # an older TopK config: activation_fn + activation_fn_kwargs, no architecture key
    older = {k: v for k, v in standard.items() if k != "architecture"}
    older.update(activation_fn="topk", activation_fn_kwargs={"k": 3}, apply_b_dec_to_input=False)
    _write_sae_lens(tmp_path / "topk", older, w)
    topk = load_sae(tmp_path / "topk")
    assert topk.kind == "topk" and topk.k == 3
    pre = x @ w["W_enc"] + w["b_enc"]
    assert ((topk.encode(x) != 0).sum(-1) <= 3).all()
    torch.testing.assert_close(topk.encode(x).max(-1).values, torch.relu(pre).max(-1).values)
    # a JumpReLU folder carries a threshold
    _write_sae_lens(tmp_path / "jump", {**standard, "architecture": "jumprelu"},
                    {**w, "threshold": torch.full((d_sae,), 0.5)})
    jump = load_sae(tmp_path / "jump")
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    torch.testing.assert_close(jump.encode(x), pre * (pre > 0.5))
    # refused rather than loaded wrong
    _write_sae_lens(tmp_path / "norm", {**standard, "normalize_activations": "expected_average_only_in"}, w)
    with pytest.raises(ValueError, match="normalize"):
        load_sae(tmp_path / "norm")
    with pytest.raises(FileNotFoundError):
        load_sae(tmp_path / "missing")


def test_unedited_sae_site_changes_nothing(gpt2_sae):
    m, sae, _ = gpt2_sae
    ids = torch.randint(2, 100, (4, 8), generator=torch.Generator().manual_seed(9))
    plain = m.run(ids).output
    for edit in (SAEFeatures(sae, features=[], op="ablate"), SAEFeatures(sae, op="scale", value=1.0),
                 SAEFeatures(sae, op="add", value=0.0)):
        out = m.run(ids, {"resid_post.0": edit}).output
        assert torch.equal(out, plain), edit.op
    # reconstruct (no error term) does change it: the SAE is not perfect
    recon = m.run(ids, {"resid_post.0": SAEFeatures(sae, op="reconstruct")}).output
    assert (recon - plain).abs().max() > 1e-4


def test_ablate_and_patch_features_match_formula(gpt2_sae):
    m, sae, _ = gpt2_sae
    g = torch.Generator().manual_seed(10)
    clean = torch.randint(2, 100, (4, 8), generator=g)
    corrupt = clean.clone()
    corrupt[:, 5] = (clean[:, 5] + 11) % 98 + 2
    x = m.capture(clean, "resid_post.0")["resid_post.0"]
    f = sae.encode(x).detach()
    j = int(f[:, -1].abs().sum(0).argmax())  # a feature active at the last position
    ablated = m.run(clean, {"resid_post.0[pos=-1]": SAEFeatures(sae, [j], "ablate")}, capture="resid_post.0")
    expected = x.clone()
    expected[:, -1] = x[:, -1] - f[:, -1, j : j + 1] * sae.W_dec[j].detach()
    torch.testing.assert_close(ablated.cache["resid_post.0"], expected, rtol=1e-5, atol=1e-5)
    # patch every feature from clean into corrupt: decode(f_clean) + corrupt's error term
    xc = m.capture(corrupt, "resid_post.0")["resid_post.0"]
    src = m.capture(clean, "resid_post.0")
    patched = m.run(corrupt, {"resid_post.0": SAEFeatures(sae, op="patch", source=src)}, capture="resid_post.0")
    want = sae.decode(sae.encode(x)) + (xc - sae.decode(sae.encode(xc)))
    torch.testing.assert_close(patched.cache["resid_post.0"], want.detach(), rtol=1e-4, atol=1e-4)
    # inputs work as a source too (run by the engine)
    again = m.run(corrupt, {"resid_post.0": SAEFeatures(sae, op="patch", source=clean)}).output
    assert torch.equal(again, patched.output)


def test_feature_patching_and_ablation_sweeps(gpt2_sae):
    m, sae, _ = gpt2_sae
    g = torch.Generator().manual_seed(11)
    clean = torch.randint(2, 100, (3, 8), generator=g)
    corrupt = clean.clone()
    corrupt[:, 4] = (clean[:, 4] + 7) % 98 + 2
    metric = cp.metrics.logit_diff(5, 7)
    feats = list(range(0, 128, 8))
    site = "resid_post.0[pos=-1]"
    big = sae_feature_patching(m, clean, corrupt, site, sae, metric, features=feats, batch_size=1000)
    small = sae_feature_patching(m, clean, corrupt, site, sae, metric, features=feats, batch_size=3)
    assert big.dims == ("feature",) and big.coords["feature"] == feats
    np.testing.assert_allclose(big.values, small.values, atol=1e-5)
    # one feature by hand
    base = metric(m.run(corrupt).output).double().mean()
    j = feats[3]
    src = m.capture(clean, "resid_post.0")
    hand = metric(m.run(corrupt, {site: SAEFeatures(sae, [j], "patch", source=src)}).output).double().mean() - base
    assert big.values[3] == pytest.approx(float(hand), abs=1e-5)
    abl = sae_feature_ablation(m, clean, site, sae, metric, features=feats)
    assert abl.dims == ("feature",) and np.isfinite(abl.values).all()
    with pytest.raises(cp.SiteError):
        m.run(clean, {"resid_post.0[dim=3]": SAEFeatures(sae, [0])})
    with pytest.raises(ValueError):
        SAEFeatures(sae, [0], "patch")


def test_sae_on_toy_adapter_channel_axis(toy):
    """Any adapter, any feature axis: an SAE on the toy's 3-class output axis."""
    xs = torch.randn(200, 3, 4, generator=torch.Generator().manual_seed(12))
    acts = site_activations(toy, xs, "out", axis="class")
    sae = train_sae(acts, 6, kind="relu", l1=1e-3, steps=100, seed=0)
    plain = toy.run(xs).output
    assert torch.equal(toy.run(xs, {"out": SAEFeatures(sae, [], axis="class")}).output, plain)
    edited = toy.run(xs, {"out": SAEFeatures(sae, None, "ablate", axis="class")}).output
    assert edited.shape == plain.shape


# ---------------------------------------------------------------- sae-lens hook names -> crosspatch sites


def _sae_lens_folder(folder, hook_name, d_in, d_sae=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = {"W_enc": torch.randn(d_in, d_sae, generator=g) / d_in**0.5, "W_dec": torch.randn(d_sae, d_in, generator=g),
         "b_enc": 0.1 * torch.randn(d_sae, generator=g), "b_dec": 0.1 * torch.randn(d_in, generator=g)}
    cfg = {"architecture": "standard", "d_in": d_in, "d_sae": d_sae, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": True, "normalize_activations": "none", "hook_name": hook_name,
           "hook_layer": 1, "model_name": "tiny", "context_size": 16, "prepend_bos": False}
    _write_sae_lens(folder, cfg, w)
    return w


@pytest.mark.parametrize("hook, site, d_in", [
    ("blocks.1.hook_resid_post", "resid_post.1", 64),
    ("blocks.1.hook_resid_pre", "resid_pre.1", 64),
    ("blocks.0.hook_resid_mid", "resid_mid.0", 64),
    ("blocks.1.attn.hook_z", "head_z.1", 64),
    ("blocks.1.hook_mlp_out", "mlp_out.1", 64),
    ("blocks.1.hook_attn_out", "attn_out.1", 64),
    ("blocks.1.mlp.hook_post", "mlp_act.1", 256),
    ("blocks.1.hook_mlp_post", "mlp_act.1", 256),
])
def test_sae_lens_hook_names_map_to_sites_that_run(tmp_path, hook, site, d_in):
    from conftest import tiny_gpt2

    _sae_lens_folder(tmp_path / "sae", hook, d_in)
    sae = load_sae(tmp_path / "sae")
    assert sae.site == site and sae.metadata["hook_name"] == hook
    m = cp.wrap(tiny_gpt2())
    ids = torch.randint(2, 100, (3, 6), generator=torch.Generator().manual_seed(1))
    plain = m.run(ids).output
    assert torch.equal(m.run(ids, {sae.site: SAEFeatures(sae, [], "ablate")}).output, plain)
    edited = m.run(ids, {sae.site: SAEFeatures(sae, None, "ablate")}).output
    assert not torch.equal(edited, plain)
    # our own save writes the crosspatch site as hook_name, and reads it back
    assert load_sae(sae.save(tmp_path / "again")).site == site


def test_hook_z_sae_reads_every_head_concatenated(tmp_path):
    """A sae-lens hook_z SAE has d_in = n_heads * d_head: the edit equals the formula on z flattened head-major."""
    from conftest import tiny_gpt2

    w = _sae_lens_folder(tmp_path / "z", "blocks.1.attn.hook_z", 64)
    sae = load_sae(tmp_path / "z")
    m = cp.wrap(tiny_gpt2())
    g = torch.Generator().manual_seed(2)
    clean = torch.randint(2, 100, (3, 7), generator=g)
    corrupt = clean.clone()
    corrupt[:, 3] = (clean[:, 3] + 5) % 98 + 2
    z = m.capture(clean, "head_z.1")["head_z.1"]  # [3, 7, 4, 16]
    flat = z.flatten(-2)
    f = torch.relu((flat - w["b_dec"]) @ w["W_enc"] + w["b_enc"])
    j = int(f.abs().sum((0, 1)).argmax())
    want = (flat - f[..., j : j + 1] * w["W_dec"][j]).unflatten(-1, (4, 16))
    got = m.run(clean, {sae.site: SAEFeatures(sae, [j], "ablate")}, capture="head_z.1").cache["head_z.1"]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # rows bound as in a sweep, and the SAE sweeps of crosspatch.methods
    bounds = [cp.Bound(cp.Site.parse(sae.site), SAEFeatures(sae, [j], "ablate"), rows=slice(0, 3))]
    tiled = m.run(torch.cat([clean, clean]), bounds).output
    torch.testing.assert_close(tiled[:3], m.run(clean, {sae.site: SAEFeatures(sae, [j], "ablate")}).output)
    assert torch.equal(tiled[3:], m.run(clean).output)
    metric = cp.metrics.logit_diff(5, 7)
    res = sae_feature_patching(m, clean, corrupt, sae.site, sae, metric, features=[0, j])
    assert res.values.shape == (2,) and np.isfinite(res.values).all()
    assert np.isfinite(sae_feature_ablation(m, clean, sae.site + "[pos=-1]", sae, metric, features=[j]).values).all()
    with pytest.raises(cp.SiteError, match="do not select 'head'"):
        m.run(clean, {"head_z.1[head=0]": SAEFeatures(sae, [j])})


def test_a_hook_without_a_crosspatch_family_is_named(tmp_path):
    _sae_lens_folder(tmp_path / "q", "blocks.1.attn.hook_q", 64)
    with pytest.raises(ValueError, match=r"cfg.json: hook_name 'blocks.1.attn.hook_q' has no crosspatch site.*"
                                         r"load_sae\(path, site="):
        load_sae(tmp_path / "q")
    sae = load_sae(tmp_path / "q", site="resid_pre.1")  # named by hand
    assert sae.site == "resid_pre.1"


@pytest.mark.parametrize("cfg_text, field", [
    (b"\xff\xfe", "not UTF-8"),
    (b"{bad json", "invalid JSON"),
    (b'["a list"]', "not an object"),
    (b'{"d_in": "64", "d_sae": 12}', "field 'd_in'"),
    (b'{"d_in": 64, "d_sae": 12, "hook_name": 3}', "field 'hook_name'"),
    (b'{"d_in": 64, "d_sae": 12, "activation_fn_kwargs": [3]}', "field 'activation_fn_kwargs'"),
])
def test_malformed_sae_folders_raise_format_error_naming_file_and_field(tmp_path, cfg_text, field):
    from crosspatch.results.formats import FormatError

    _sae_lens_folder(tmp_path / "s", "blocks.1.hook_resid_post", 64)
    (tmp_path / "s" / "cfg.json").write_bytes(cfg_text)
    with pytest.raises(FormatError, match=field) as info:
        load_sae(tmp_path / "s")
    assert "cfg.json" in str(info.value)
    (tmp_path / "s" / "cfg.json").write_text('{"d_in": 64, "d_sae": 12}')
    (tmp_path / "s" / "sae_weights.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(FormatError, match="sae_weights.safetensors"):
        load_sae(tmp_path / "s")


def test_sae_lens_6_folders_hook_in_metadata_decoder_norm_rescaling_and_signed_thresholds(tmp_path):
    """sae-lens 6 writes the hook into ``metadata``; its TopK SAEs may scale pre-activations by the decoder
    row norms (and divide features by them before decoding); its JumpReLU is ReLU then the threshold."""
    g = torch.Generator().manual_seed(3)
    d_in, d_sae, k = 8, 20, 4
    w = {"W_enc": torch.randn(d_in, d_sae, generator=g), "W_dec": torch.randn(d_sae, d_in, generator=g),
         "b_enc": torch.randn(d_sae, generator=g), "b_dec": torch.randn(d_in, generator=g)}
    base = {"d_in": d_in, "d_sae": d_sae, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
            "normalize_activations": "none", "reshape_activations": "none",
            "metadata": {"sae_lens_version": "6.54.12", "hook_name": "blocks.2.hook_resid_post", "model_name": "tiny"}}
    x = torch.randn(6, d_in, generator=g)
    norms = w["W_dec"].norm(dim=-1)
    pre = ((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]) * norms
    values, index = pre.topk(k, dim=-1)
    f = torch.zeros_like(pre).scatter(-1, index, torch.relu(values))

    _write_sae_lens(tmp_path / "topk", {**base, "architecture": "topk", "k": k, "rescale_acts_by_decoder_norm": True}, w)
    topk = load_sae(tmp_path / "topk")
    assert topk.site == "resid_post.2" and topk.metadata["hook_name"] == "blocks.2.hook_resid_post"
    torch.testing.assert_close(topk.encode(x), f)
    torch.testing.assert_close(topk.decode(f), (f / norms) @ w["W_dec"] + w["b_dec"])
    back = load_sae(topk.save(tmp_path / "again"))  # our own save keeps the rescaling
    assert back.rescale_by_decoder_norm and torch.equal(back(x), topk(x))

    threshold = 0.5 * torch.randn(d_sae, generator=g)  # some below zero
    assert (threshold < 0).any()
    _write_sae_lens(tmp_path / "jump", {**base, "architecture": "jumprelu"}, {**w, "threshold": threshold})
    jump = load_sae(tmp_path / "jump")
    plain = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    torch.testing.assert_close(jump.encode(x), torch.relu(plain) * (plain > threshold))
    assert (jump.encode(x) >= 0).all()

    _write_sae_lens(tmp_path / "relu", {**base, "architecture": "standard", "rescale_acts_by_decoder_norm": True}, w)
    with pytest.raises(ValueError, match="rescale_acts_by_decoder_norm is known for TopK SAEs only"):
        load_sae(tmp_path / "relu")
