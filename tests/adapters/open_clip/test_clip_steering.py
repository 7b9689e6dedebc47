"""Steering uses one API across architectures: here a CLIP vision tower (the LM and VAE cases are in
tests/core/test_steering.py and examples/steering_study.py)."""

import numpy as np
import torch

import crosspatch as cp
from clip_models import images, tiny_open_clip


def test_steering_curve_on_the_vision_tower_equals_adding_the_vector_by_hand():
    m = cp.wrap(tiny_open_clip())
    pos, neg = images(4, seed=1), images(4, seed=2) * 0.2
    x = images(3, seed=3)
    site = "vision.resid_post.0"
    vector = cp.steering_vector(m, pos, neg, site)
    assert vector.shape[-1] == m.catalog.family("vision.resid_post").axis("dim").size

    def cosine_to_positive(embed):  # image-only runs output image_embed
        target = m.run(pos).output.mean(0)
        return torch.nn.functional.cosine_similarity(embed, target.expand_as(embed), dim=-1)

    curve = cp.steering_curve(m, x, site, [0.0, 0.5, 1.0, 2.0], cosine_to_positive, vector=vector)
    assert curve.dims == ("alpha",)
    # alpha 0 changes nothing (values are relative to the unsteered run; rows batched differently round differently)
    assert abs(curve.values[0]) < 1e-6
    assert curve.values[-1] > 0.0  # towards the positive images
    # Batched equals applying Add by hand, one strength at a time.
    base = cosine_to_positive(m.run(x).output).mean()
    for alpha, value in zip([0.5, 1.0, 2.0], curve.values[1:]):
        steered = cosine_to_positive(m.run(x, {site: cp.Add(vector, alpha)}).output).mean()
        np.testing.assert_allclose(value, float(steered - base), atol=1e-5)
