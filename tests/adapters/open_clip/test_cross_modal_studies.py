"""Cross-modal studies: exact decomposition, patching between modalities, ablation curves, TextSpan."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import crosspatch as cp
from clip_models import images, texts, tiny_open_clip
from crosspatch.methods import cross_modal


@pytest.mark.parametrize("variant", [{}, {"ls_init_value": 0.5}, {"pool_type": "avg"}, {"pool_type": "avg", "final_ln_after_pool": True}])
def test_the_decomposition_sums_to_the_embedding(variant):
    m = cp.wrap(tiny_open_clip(**variant))
    dec = cross_modal.decompose_image_embedding(m, images(5), batch_size=2, progress=False)
    assert dec.components == ["embed", "attn.0", "mlp.0", "attn.1", "mlp.1"]
    assert dec.layers.shape == (5, 5, 24) and dec.heads.shape == (5, 2, 4, 24)
    torch.testing.assert_close(dec.embedding, m.run(images(5)).output.double(), atol=1e-6, rtol=0)
    assert dec.error() < 1e-5, dec.error()  # embed + attention + MLP contributions + constant = embedding
    assert dec.head_error() < 1e-6  # heads + the output bias = the attention layer
    norms = dec.norms()
    assert norms.dims == ("component",) and dec.head_norms().values.shape == (2, 4)


def test_patching_between_modalities_is_normalised_to_the_pair_gap():
    m = cp.wrap(tiny_open_clip())
    x, y, a, b = images(3, seed=1), images(3, seed=2), texts(3, seed=1), texts(3, seed=2)
    res = cross_modal.image_pair_patching(m, x, y, a, b, ["vision.resid_post.1", "vision.embed"], progress=False)
    np.testing.assert_allclose(res.values, 1.0, atol=1e-4)  # the whole residual stream restores everything
    assert res.metadata["method"] == "image_pair_patching" and res.metadata["rows"] == "images"
    res = cross_modal.text_pair_patching(m, a, b, x, y, ["text.resid_post.1[pos=7]", "text.resid_post.1[pos=0:7]"],
                                         progress=False)
    np.testing.assert_allclose(res.values, [1.0, 0.0], atol=1e-4)  # only the end token is read out
    with pytest.raises(ValueError, match="shared candidates"):
        cross_modal.image_pair_patching(m, x, y, a, b, "text.resid_post.*", progress=False)


def test_mean_ablation_curves():
    m = cp.wrap(tiny_open_clip())
    x, candidates = images(12), texts(4)
    labels = torch.tensor([0, 1, 2, 3] * 3)
    res = cross_modal.mean_ablation_curves(m, x, candidates, labels, progress=False)
    assert res.dims == ("ablation", "layer") and res.values.shape == (6, 2)
    assert res.coords["ablation"][:3] == ["attn direct", "attn direct ≤ l", "attn total"]
    assert ((res.values >= 0) & (res.values <= 1)).all()
    assert res.metadata["chance"] == 0.25
    base = cross_modal.zero_shot_accuracy(m, x, candidates, labels)
    assert res.metadata["baseline"] == pytest.approx(base)
    # the last MLP writes straight into the readout: its direct and total effects are the same thing
    assert res.sel(ablation="mlp direct").values[-1] == pytest.approx(res.sel(ablation="mlp total").values[-1])


def test_textspan_finds_planted_directions_and_factors_explain_heads():
    gen = torch.Generator().manual_seed(0)
    n, e = 400, 16
    words = ["red", "blue", "circle", "square", "top"]
    directions = torch.linalg.qr(torch.randn(e, len(words), generator=gen))[0].T  # orthonormal
    colour = torch.randint(2, (n,), generator=gen)
    shape = torch.randint(2, (n,), generator=gen)
    heads = torch.zeros(n, 1, 2, e, dtype=torch.float64)
    heads[:, 0, 0] = (colour * 2.0 - 1)[:, None] * directions[0] + 0.1 * (shape * 2.0 - 1)[:, None] * directions[3]
    heads[:, 0, 1] = (shape * 2.0 - 1)[:, None] * directions[2]
    heads += 0.01 * torch.randn(heads.shape, generator=gen, dtype=torch.float64)
    res = cross_modal.textspan(heads, directions, words, k=2)
    assert res.metadata["words"][0][0] == ["red", "square"]
    assert res.metadata["words"][0][1][0] == "circle"
    assert res.values[0, 0, 0] > 0.95 and res.values.shape == (1, 2, 2)
    eta = cross_modal.factor_alignment(heads, {"colour": colour, "shape": shape})
    assert eta.dims == ("layer", "head", "factor")
    assert eta.values[0, 0, 0] > 0.95 and eta.values[0, 1, 1] > 0.99 and eta.values[0, 1, 0] < 0.05


def test_word_directions():
    embeds = torch.eye(3, dtype=torch.float64)
    captions = ["a red circle", "a blue circle", "a red square"]
    d = cross_modal.word_directions(embeds, captions, ["red", "circle"])
    torch.testing.assert_close(d[0], torch.tensor([0.5, 0, 0.5], dtype=torch.float64) - 1 / 3)
    with pytest.raises(ValueError, match="no caption contains"):
        cross_modal.word_directions(embeds, captions, ["green"])
