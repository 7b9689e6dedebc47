"""Saved-module folders (TaskRNN, SAE, transcoder, trainable intervention) written and read by one
TensorFolder: each kind round-trips, reads the folders its earlier code wrote (tests/data/saved_modules),
and writes the very bytes that code wrote."""

from __future__ import annotations

import json
import shutil
import struct

import pytest
import torch

import saved_modules
from crosspatch.results.formats import FormatError
from crosspatch.results.tensor_folder import TensorFolder, load_tensors, read_tensors
from saved_modules import DATA, KINDS, build, load, save

FILES = {
    "task_rnn": ("shape.json", "model.safetensors", "info.json"),
    "sae": ("cfg.json", "sae_weights.safetensors"),
    "transcoder": ("transcoder.json", "transcoder.safetensors"),
    "trainable": ("config.json", "weights.safetensors"),
}


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for name in sa:
        assert sa[name].dtype == sb[name].dtype and torch.equal(sa[name], sb[name]), name


def _safetensors_parts(path) -> tuple[dict, bytes]:
    """The header (tensor names to dtype, shape and offsets) and the data bytes of a safetensors file."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _config_without_origin(module: torch.nn.Module) -> dict:
    config = module.shape.to_dict() if hasattr(module, "shape") else module.config()
    metadata = config.get("metadata")
    if isinstance(metadata, dict):  # a loaded SAE records where it came from and its hook name
        config["metadata"] = {k: v for k, v in metadata.items() if k not in ("loaded_from", "hook_name")}
    return config


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip(kind, tmp_path):
    module = build(kind)
    back = load(kind, save(kind, module, tmp_path / kind))
    assert type(back) is type(module)
    _same_state(back, module)
    assert _config_without_origin(back) == _config_without_origin(module)


@pytest.mark.parametrize("kind", KINDS)
def test_folders_written_before_still_load(kind):
    """The checked-in folders were written by each kind's own save code before the shared writer."""
    assert sorted(p.name for p in (DATA / kind).iterdir()) == sorted(FILES[kind])
    back = load(kind, DATA / kind)
    expected = build(kind)
    _same_state(back, expected)
    assert _config_without_origin(back) == _config_without_origin(expected)


@pytest.mark.parametrize("kind", KINDS)
def test_saving_writes_the_bytes_the_earlier_code_wrote(kind, tmp_path):
    folder = save(kind, build(kind), tmp_path / kind)
    assert sorted(p.name for p in folder.iterdir()) == sorted(FILES[kind])
    for name in FILES[kind]:
        if name.endswith(".json"):
            assert (folder / name).read_bytes() == (DATA / kind / name).read_bytes(), name
        else:
            assert _safetensors_parts(folder / name) == _safetensors_parts(DATA / kind / name), name


def test_loaded_modules_compute_what_the_formula_weights_do():
    """A checked-in SAE and TaskRNN answer like the modules built from the formula (a forward, not only the state)."""
    x = torch.linspace(-1, 1, 12).reshape(3, 4)
    assert torch.equal(load("sae", DATA / "sae")(x), saved_modules.sae()(x))
    seqs = torch.tensor([[[0.0, 1.0], [1.0, 1.0], [1.0, 0.0]]])
    assert torch.equal(load("task_rnn", DATA / "task_rnn")(seqs), saved_modules.task_rnn()(seqs))


def test_a_trainable_folder_with_torch_weights_loads(tmp_path):
    """Folders saved where safetensors was missing name ``weights.pt`` in their config."""
    folder = shutil.copytree(DATA / "trainable", tmp_path / "t")
    torch.save(load_tensors(folder / "weights.safetensors"), folder / "weights.pt")
    (folder / "weights.safetensors").unlink()
    meta = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**meta, "weights": "weights.pt"}))
    _same_state(load("trainable", folder), build("trainable"))


LAYOUT = TensorFolder("cfg.json", "w.safetensors", "a test module")


def test_tensor_folder_names_what_is_missing_or_malformed(tmp_path):
    folder = LAYOUT.write(tmp_path / "m", {"b": 1, "a": [2]}, {"x": torch.arange(3.0)})
    assert (folder / "cfg.json").read_text() == '{\n  "b": 1,\n  "a": [\n    2\n  ]\n}'
    config, tensors = LAYOUT.read(folder)
    assert config == {"b": 1, "a": [2]} and torch.equal(tensors["x"], torch.arange(3.0))
    (folder / "w.safetensors").write_bytes(b"garbage")
    with pytest.raises(FormatError, match=r"w.safetensors is not a safetensors file of test module weights"):
        LAYOUT.read(folder)
    (folder / "cfg.json").write_text("{")
    with pytest.raises(FormatError, match=r"cfg.json is not a test module config: invalid JSON"):
        LAYOUT.read_config(folder)
    (folder / "w.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"is not a test module folder: it needs cfg.json and "
                                                r"w.safetensors and has no w.safetensors \(hint\)"):
        LAYOUT.read(folder, hint=" (hint)")
    assert LAYOUT.require(folder, weights=False)[0] == folder / "cfg.json"
    with pytest.raises(FormatError, match="nothing.safetensors is not a safetensors file of things"):
        read_tensors(tmp_path / "nothing.safetensors", "things")


def test_sorted_json_with_a_final_newline(tmp_path):
    layout = TensorFolder("c.json", "w.safetensors", "a module", sort_keys=True, final_newline=True)
    layout.write(tmp_path, {"b": 1, "a": 2}, {})
    assert (tmp_path / "c.json").read_text() == '{\n  "a": 2,\n  "b": 1\n}\n'


def test_a_task_rnn_shape_that_is_not_json_is_a_format_error(tmp_path):
    folder = shutil.copytree(DATA / "task_rnn", tmp_path / "r")
    (folder / "shape.json").write_text("[1]")
    with pytest.raises(FormatError, match=r"shape.json is not a saved TaskRNN config: it holds a JSON list"):
        load("task_rnn", folder)
