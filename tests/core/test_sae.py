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
