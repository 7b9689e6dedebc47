"""Trainable-intervention folders: a malformed config.json is one FormatError naming the file and the
field; the ``weights`` field names a file inside the folder, never outside it."""

from __future__ import annotations

import json

import pytest
import torch

from crosspatch.results.formats import FormatError
from crosspatch.trainable.base import TrainableIntervention, load
from crosspatch.trainable.das import RotatedSubspace


@pytest.fixture
def folder(tmp_path):
    return RotatedSubspace(6, 2, seed=1).save(tmp_path / "das")


def _edit(folder, **changes):
    meta = json.loads((folder / "config.json").read_text())
    meta.update(changes)
    (folder / "config.json").write_text(json.dumps(meta))


def test_a_saved_folder_loads(folder):
    back = load(folder)
    assert isinstance(back, RotatedSubspace) and back.k == 2


@pytest.mark.parametrize("text, field", [
    (b"\xff\xfe\x00", "not UTF-8"),
    (b"{", "invalid JSON"),
    (b"3", "not an object"),
])
def test_unreadable_configs(folder, text, field):
    (folder / "config.json").write_bytes(text)
    with pytest.raises(FormatError, match=field) as info:
        TrainableIntervention.load(folder)
    assert "config.json" in str(info.value)


@pytest.mark.parametrize("changes, field", [
    ({"kind": 3}, "field 'kind' should be a string"),
    ({"config": [1, 2]}, "field 'config' should be an object"),
    ({"format_version": "1"}, "field 'format_version' should be an integer"),
    ({"weights": 7}, "field 'weights' should be a string"),
    ({"config": {"no_such_argument": 1}}, "field 'config' does not rebuild"),
    ({"weights": "other.safetensors"}, "field 'weights' names other.safetensors, which is not in"),
    ({"format": "something"}, "not a crosspatch trainable intervention"),
])
def test_wrong_fields_are_named(folder, changes, field):
    _edit(folder, **changes)
    with pytest.raises(FormatError, match=field):
        load(folder)


@pytest.mark.parametrize("weights", ["../outside.safetensors", "/etc/passwd", "sub/../../x.pt", "link.safetensors"])
def test_weights_may_not_point_outside_the_folder(folder, tmp_path, weights):
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes((folder / "weights.safetensors").read_bytes())
    (folder / "link.safetensors").symlink_to(outside)
    _edit(folder, weights=weights)
    with pytest.raises(FormatError, match=r"field 'weights' is .*points outside the folder"):
        load(folder)


def test_a_weights_file_that_is_not_one(folder):
    (folder / "weights.safetensors").write_bytes(b"garbage")
    with pytest.raises(FormatError, match=r"weights.safetensors \(field 'weights' of .*config.json\) is not a weights"):
        load(folder)
    torch.save({"x": torch.zeros(1)}, folder / "w.pt")
    _edit(folder, weights="w.pt")
    with pytest.raises(FormatError, match="does not rebuild"):
        load(folder)
