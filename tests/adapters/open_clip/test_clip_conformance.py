"""Both CLIP adapters pass crosspatch's adapter conformance suite, with image-caption pairs as rows."""

from __future__ import annotations

import pytest
import torch

import crosspatch as cp
from clip_models import images, texts, tiny_open_clip
from crosspatch.testing import assert_conforms


def pairs() -> dict:
    return {"images": images(3), "texts": texts(3), "rows": "pairs"}


@pytest.mark.parametrize("library", ["open_clip", "transformers"])
def test_conformance_suite(library):
    model = tiny_open_clip(sharpen=False)
    if library == "transformers":
        from crosspatch.adapters.open_clip import to_transformers

        model = to_transformers(model)
    assert_conforms(model, pairs())


def test_paired_rows_score_each_image_with_its_own_caption():
    model = tiny_open_clip()
    m = cp.wrap(model)
    x, ids = images(3), texts(3)
    paired = m.run({"images": x, "texts": ids, "rows": "pairs"})
    full = m.run({"images": x, "texts": ids}).output
    assert paired.output.shape == (3, 1)
    torch.testing.assert_close(paired.output[:, 0], full.diagonal(), atol=1e-5, rtol=0)
    # both towers are rows: a text-site intervention bound to one row changes only that row
    bound = cp.Bound(cp.Site.parse("text.resid_post.1"), cp.Zero(), slice(1, 2))
    edited = m.run({"images": x, "texts": ids, "rows": "pairs"}, [bound]).output
    assert torch.equal(edited[[0, 2]], paired.output[[0, 2]]) and not torch.equal(edited[1], paired.output[1])
    for rows in ("images", "texts", "pairs"):  # preparing prepared inputs keeps the mode
        prepared = m.prepare({"images": x, "texts": ids, "rows": rows})
        assert m.prepare(prepared)["rows"] == rows and list(m.prepare(prepared)) == list(prepared)
    with pytest.raises(ValueError, match="3 images and 2 texts"):
        m.run({"images": x, "texts": ids[:2], "rows": "pairs"})
