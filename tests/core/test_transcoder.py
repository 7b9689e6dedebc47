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
    tc = train_transcoder(xs, ys, 128, *SITES, kind=kind, cross_layer=cross_layer, k=8, steps=250, lr=5e-3,
                          batch_size=256, progress=False)
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
