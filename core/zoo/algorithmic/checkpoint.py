"""A :class:`TaskRNN` on disk: ``model.safetensors`` (the state dict) and ``shape.json`` (its :class:`RNNShape`).

    save_task_rnn(model, folder, info={"task": "parity-last2"})
    model, info = load_task_rnn(folder)

``info`` (optional, ``info.json``) holds JSON-able facts such as the task and the search's accuracies.
The two files are a :class:`~crosspatch.results.tensor_folder.TensorFolder`, as every saved module is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ...results.formats import read_json
from ...results.tensor_folder import TensorFolder, write_json
from .rnn import RNNShape, TaskRNN

__all__ = ["INFO_FILE", "SHAPE_FILE", "TASK_RNN_FOLDER", "WEIGHTS_FILE", "load_task_rnn", "save_task_rnn"]

WEIGHTS_FILE, SHAPE_FILE, INFO_FILE = "model.safetensors", "shape.json", "info.json"
TASK_RNN_FOLDER = TensorFolder(SHAPE_FILE, WEIGHTS_FILE, "a saved TaskRNN", sort_keys=True)


def save_task_rnn(model: TaskRNN, folder: str | Path, info: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (and ``info``) into ``folder``, created if missing; the folder."""
    folder = TASK_RNN_FOLDER.write(folder, model.shape.to_dict(), model.state_dict())
    if info is not None:
        write_json(folder / INFO_FILE, info, sort_keys=True, default=str)
    return folder


def load_task_rnn(folder: str | Path) -> tuple[TaskRNN, dict[str, Any]]:
    """The :class:`TaskRNN` saved in ``folder`` (eval mode) and its ``info`` (``{}`` if none)."""
    shape, state = TASK_RNN_FOLDER.read(folder)
    model = TaskRNN(RNNShape.from_dict(shape))
    model.load_state_dict(state)
    model.eval()
    info_path = Path(folder) / INFO_FILE
    info = read_json(info_path, "the info of a saved TaskRNN") if info_path.is_file() else {}
    return model, info
