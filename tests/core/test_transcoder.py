"""Transcoders: JumpReLU's straight-through gradient, training per layer and across layers, files."""

from __future__ import annotations

import pytest
import torch

import crosspatch as cp
from crosspatch.results.formats import FormatError
from crosspatch.trainable.jumprelu import jumprelu, step
from crosspatch.trainable.transcoder import Transcoder, collect_pairs, load_transcoder, train_transcoder


def test_jumprelu_gradients_are_the_rectangle_kernel():
    z = torch.tensor([0.10, 0.48, 0.52, 0.70, 1.00], dtype=torch.float64, requires_grad=True)
    theta = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    eps = 0.1
    y = jumprelu(z, theta, eps)
    assert y.tolist() == [0.0, 0.0, 0.52, 0.70, 1.00]
    y.sum().backward()
    assert z.grad.tolist() == [0.0, 0.0, 1.0, 1.0, 1.0]  # H(z - theta), exact
    # only z within eps/2 of theta count: -(theta / eps) each (0.48 and 0.52)
    assert float(theta.grad) == pytest.approx(-2 * 0.5 / 0.1)
    theta.grad = None
    z2 = z.detach().clone().requires_grad_(True)
    step(z2, theta, eps).sum().backward()
    assert float(theta.grad) == pytest.approx(-2 / 0.1) and z2.grad.abs().sum() == 0


def test_jumprelu_threshold_gradient_matches_a_smoothed_finite_difference():
    """Averaged over many pre-activations, d/dtheta sum(jumprelu) equals the derivative of its expectation
    (the kernel estimates the density at theta)."""
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(400_000, generator=gen, dtype=torch.float64)
    theta = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    jumprelu(z, theta, 0.02).mean().backward()
    with torch.no_grad():
        h = 0.02
        fd = (jumprelu(z, theta + h / 2, 0.02).mean() - jumprelu(z, theta - h / 2, 0.02).mean()) / h
    assert float(theta.grad) == pytest.approx(float(fd), rel=0.05)


@pytest.fixture(scope="module")
def pairs():
    from conftest import tiny_gpt2

    m = cp.wrap(tiny_gpt2())
    ids = torch.randint(1, 100, (24, 12), generator=torch.Generator().manual_seed(0))
    return m, collect_pairs(m, ids, ["mlp_in.0", "mlp_in.1"], ["mlp_out.0", "mlp_out.1"])


SITES = (["mlp_in.0", "mlp_in.1"], ["mlp_out.0", "mlp_out.1"])


@pytest.mark.parametrize("kind,cross_layer", [("jumprelu", False), ("topk", False), ("jumprelu", True)])
def test_training_reconstructs_the_mlp_outputs(pairs, kind, cross_layer):
    m, (xs, ys) = pairs
    assert xs[0].shape == (24 * 12, 64)
    tc = train_transcoder(xs, ys, 128, *SITES, kind=kind, cross_layer=cross_layer, k=8, steps=150, lr=5e-3,
                          batch_size=128, progress=False)
    stats = tc.metadata["train"]
    assert stats["fvu"] < 0.3, stats  # a transcoder that learned nothing has FVU >= 1
    if kind == "topk":
        assert max(stats["l0_per_source"]) <= 8
    else:
        assert 0 < max(stats["l0_per_source"]) < 128
    # the metrics are the model's own numbers on the training rows, in the model's units
    assert tc.evaluate(xs, ys)["fvu"] == pytest.approx(stats["fvu"])
    if cross_layer:
        assert tc.W_dec[0].shape == (128, 2, 64) and tc.W_dec[1].shape == (128, 1, 64)


def test_cross_layer_decoding_sums_every_earlier_source():
    tc = Transcoder(3, 2, 4, ["mlp_in.0", "mlp_in.1"], ["mlp_out.0", "mlp_out.1"], cross_layer=True, kind="relu")
    with torch.no_grad():
        for p in tc.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    f0, f1 = torch.rand(5, 4), torch.rand(5, 4)
    y0, y1 = tc.decode([f0, f1])
    torch.testing.assert_close(y0, f0 @ tc.W_dec[0][:, 0] + tc.b_dec[0])
    torch.testing.assert_close(y1, f0 @ tc.W_dec[0][:, 1] + f1 @ tc.W_dec[1][:, 0] + tc.b_dec[1])
    with pytest.raises(ValueError, match="does not write output 0"):
        tc.decoder(1, 0)


def test_save_and_load_round_trip(tmp_path):
    tc = Transcoder(6, 5, 7, ["mlp_in.0", "mlp_in.2"], ["mlp_out.0", "mlp_out.2"], cross_layer=True, kind="topk", k=3,
                    metadata={"note": "x"})
    with torch.no_grad():
        for p in tc.parameters():
            p.normal_()
    back = load_transcoder(tc.save(tmp_path / "tc"))
    assert back.config() == tc.config()
    for (name, a), (_, b) in zip(tc.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), name
    x = [torch.randn(4, 6), torch.randn(4, 6)]
    for a, b in zip(tc(x), back(x)):
        assert torch.equal(a, b)
    (tmp_path / "tc" / "transcoder.json").write_text('{"d_in": "six"}')
    with pytest.raises(FormatError, match="d_in"):
        load_transcoder(tmp_path / "tc")


def test_bad_configurations_are_named():
    with pytest.raises(ValueError, match="one output site per input site"):
        Transcoder(4, 4, 8, ["mlp_in.0"], ["mlp_out.0", "mlp_out.1"])
    with pytest.raises(ValueError, match="0 < k <= n_features=8"):
        Transcoder(4, 4, 8, ["mlp_in.0"], ["mlp_out.0"], kind="topk", k=9)
    with pytest.raises(ValueError, match="kind must be one of"):
        Transcoder(4, 4, 8, ["mlp_in.0"], ["mlp_out.0"], kind="gelu")


# ---------------------------------------------------------------------- published layouts (fixtures written here)


def _ct_forward_plt(layers, xs, kind="jumprelu"):
    """circuit-tracer's per-layer forward, written out: F.linear(x, W_enc, b_enc), JumpReLU, acts @ W_dec + b_dec."""
    out = []
    for w, x in zip(layers, xs):
        pre = x @ w["W_enc"].T + w["b_enc"]
        if kind == "jumprelu":
            acts = pre * (pre > w["activation_function.threshold"])
        else:
            top = pre.topk(int(w["k"]), -1)
            acts = torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
        out.append(acts @ w["W_dec"] + w["b_dec"])
    return out


def _write_yaml(path, text):
    path.write_text(text, encoding="utf-8")


@pytest.mark.parametrize("kind", ["jumprelu", "topk"])
def test_circuit_tracer_transcoder_set_folder(tmp_path, kind):
    from safetensors.torch import save_file

    from crosspatch.trainable.transcoder_formats import load_published

    gen = torch.Generator().manual_seed(0)
    layers = []
    for i in range(2):
        w = {"W_enc": torch.randn(9, 5, generator=gen), "W_dec": torch.randn(9, 5, generator=gen),
             "b_enc": torch.randn(9, generator=gen), "b_dec": torch.randn(5, generator=gen)}
        if kind == "jumprelu":
            w["activation_function.threshold"] = torch.rand(9, generator=gen)
        else:
            w["k"] = torch.tensor(3)
        save_file(w, str(tmp_path / f"layer_{i}.safetensors"))
        layers.append(w)
    _write_yaml(tmp_path / "config.yaml", (
        "model_kind: transcoder_set\nmodel_name: my/model\nscan: my-scan\n"
        "feature_input_hook: hook_resid_mid\nfeature_output_hook: hook_mlp_out\n"
        "transcoders:\n  - hf://org/repo/layer_0.safetensors\n  - layer_1.safetensors\n"
        + ("activation: topk\n" if kind == "topk" else "")))
    tc = load_published(tmp_path)
    assert tc.input_sites == ["mlp_in.0", "mlp_in.1"] and tc.output_sites == ["mlp_out.0", "mlp_out.1"]
    assert tc.kind == kind and not tc.cross_layer and not tc.normalized_input
    xs = [torch.randn(4, 5, generator=gen) for _ in range(2)]
    for mine, ref in zip(tc(xs), _ct_forward_plt(layers, xs, kind)):
        torch.testing.assert_close(mine, ref)


def test_circuit_tracer_cross_layer_folder(tmp_path):
    from safetensors.torch import save_file

    from crosspatch.trainable.transcoder_formats import load_published

    gen = torch.Generator().manual_seed(1)
    n, F, d = 3, 7, 4
    enc, dec = [], []
    for i in range(n):
        e = {f"W_enc_{i}": torch.randn(F, d, generator=gen), f"b_enc_{i}": torch.randn(F, generator=gen),
             f"b_dec_{i}": torch.randn(d, generator=gen), f"threshold_{i}": torch.rand(F, generator=gen)}
        w = {f"W_dec_{i}": torch.randn(F, n - i, d, generator=gen)}
        save_file(e, str(tmp_path / f"W_enc_{i}.safetensors"))
        save_file(w, str(tmp_path / f"W_dec_{i}.safetensors"))
        enc.append(e)
        dec.append(w[f"W_dec_{i}"])
    _write_yaml(tmp_path / "config.yaml", "model_kind: cross_layer_transcoder\nfeature_input_hook: hook_resid_mid\n"
                                          "feature_output_hook: hook_mlp_out\n")
    tc = load_published(tmp_path)
    assert tc.cross_layer and tc.kind == "jumprelu" and tc.n == 3
    xs = [torch.randn(2, d, generator=gen) for _ in range(n)]
    acts = []
    for i in range(n):
        pre = xs[i] @ enc[i][f"W_enc_{i}"].T + enc[i][f"b_enc_{i}"]
        acts.append(pre * (pre > enc[i][f"threshold_{i}"]))
    for j, mine in enumerate(tc(xs)):
        ref = sum(acts[i] @ dec[i][:, j - i] for i in range(j + 1)) + enc[j][f"b_dec_{j}"]
        torch.testing.assert_close(mine, ref)


def test_gemma_scope_npz_reads_the_normed_input(tmp_path):
    import numpy as np

    from crosspatch.trainable.transcoder_formats import load_gemma_scope, load_published

    gen = np.random.default_rng(0)
    params = {"W_enc": gen.normal(size=(4, 6)), "W_dec": gen.normal(size=(6, 4)), "b_enc": gen.normal(size=6),
              "b_dec": gen.normal(size=4), "threshold": gen.random(6)}
    (tmp_path / "layer_0").mkdir()
    np.savez(tmp_path / "layer_0" / "params.npz", **{k: v.astype(np.float32) for k, v in params.items()})
    tc = load_gemma_scope([tmp_path / "layer_0" / "params.npz"])
    assert tc.normalized_input and tc.input_sites == ["mlp_in.0"]
    x = torch.randn(3, 4)
    pre = x @ torch.tensor(params["W_enc"], dtype=torch.float32) + torch.tensor(params["b_enc"], dtype=torch.float32)
    acts = pre * (pre > torch.tensor(params["threshold"], dtype=torch.float32))
    ref = acts @ torch.tensor(params["W_dec"], dtype=torch.float32) + torch.tensor(params["b_dec"], dtype=torch.float32)
    torch.testing.assert_close(tc([x])[0], ref)
    _write_yaml(tmp_path / "config.yaml", "model_kind: transcoder_set\nfeature_input_hook: ln2.hook_normalized\n"
                                          "feature_output_hook: hook_mlp_out\ntranscoders:\n  - layer_0/params.npz\n")
    assert load_published(tmp_path).normalized_input


def test_published_folders_that_cannot_load_say_why(tmp_path):
    from safetensors.torch import save_file

    from crosspatch.trainable.transcoder_formats import load_published

    with pytest.raises(FileNotFoundError, match="config.yaml"):
        load_published(tmp_path)
    _write_yaml(tmp_path / "config.yaml", "model_kind: sae\n")
    with pytest.raises(FormatError, match="model_kind"):
        load_published(tmp_path)
    _write_yaml(tmp_path / "config.yaml", "model_kind: transcoder_set\nfeature_input_hook: hook_resid_mid\n"
                "feature_output_hook: hook_mlp_out\ntranscoders:\n  - hf://o/r/x.safetensors\n")
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        load_published(tmp_path)
    w = {k: torch.zeros(3, 2) for k in ("W_enc", "W_dec")} | {"b_enc": torch.zeros(3), "b_dec": torch.zeros(2),
                                                              "W_skip": torch.zeros(3, 2)}
    save_file(w, str(tmp_path / "x.safetensors"))
    with pytest.raises(FormatError, match=r"W_skip is \(3, 2\), expected \[d_out, d_in\] = \[2, 2\]"):
        load_published(tmp_path)
    _write_yaml(tmp_path / "config.yaml", "model_kind: transcoder_set\nfeature_input_hook: hook_attn_out\n"
                                          "feature_output_hook: hook_mlp_out\ntranscoders:\n  - x.safetensors\n")
    with pytest.raises(ValueError, match="no crosspatch site"):
        load_published(tmp_path)


def test_a_skip_transcoder_set_loads_and_adds_x_at_w_skip_transposed(tmp_path):
    """circuit-tracer's skip transcoders: each layer's output is decode(features) + x @ W_skip.T, written by hand
    here from the file's tensors; saved and reloaded through crosspatch's own folder format unchanged."""
    from safetensors.torch import save_file

    from crosspatch.trainable.transcoder import load_transcoder
    from crosspatch.trainable.transcoder_formats import load_published

    gen = torch.Generator().manual_seed(0)
    d, f = 4, 6
    files = []
    for layer in range(2):
        w = {"W_enc": torch.randn(f, d, generator=gen), "W_dec": torch.randn(f, d, generator=gen),
             "b_enc": torch.randn(f, generator=gen), "b_dec": torch.randn(d, generator=gen),
             "W_skip": torch.randn(d, d, generator=gen)}
        save_file(w, str(tmp_path / f"layer_{layer}.safetensors"))
        files.append(w)
    _write_yaml(tmp_path / "config.yaml", "model_kind: transcoder_set\nfeature_input_hook: hook_resid_mid\n"
                                          "feature_output_hook: hook_mlp_out\n")
    tc = load_published(tmp_path, activation="relu")
    assert tc.W_skip is not None and tc.config()["skip"] is True
    x = [torch.randn(5, d, generator=gen) for _ in range(2)]
    out = tc(x)
    for layer, w in enumerate(files):
        expected = torch.relu(x[layer] @ w["W_enc"].T + w["b_enc"]) @ w["W_dec"] + w["b_dec"] + x[layer] @ w["W_skip"].T
        torch.testing.assert_close(out[layer], expected, rtol=1e-5, atol=1e-5)
        assert float((x[layer] @ w["W_skip"].T).abs().max()) > 0.1  # the skip term is there to be checked
    again = load_transcoder(tc.save(tmp_path / "saved"))
    assert again.W_skip is not None and torch.equal(again.W_skip, tc.W_skip)
    for a, b in zip(again(x), out):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
