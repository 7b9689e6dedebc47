"""A :class:`TaskRNN` on disk: ``model.safetensors`` (the state dict) and ``shape.json`` (its :class:`RNNShape`).

    save_task_rnn(model, folder, info={"task": "parity-last2"})
    model, info = load_task_rnn(folder)

``info`` (optional, ``info.json``) holds JSON-able facts such as the task and the search's accuracies.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .rnn import RNNShape, TaskRNN

__all__ = ["INFO_FILE", "SHAPE_FILE", "WEIGHTS_FILE", "load_task_rnn", "save_task_rnn"]

WEIGHTS_FILE, SHAPE_FILE, INFO_FILE = "model.safetensors", "shape.json", "info.json"


def save_task_rnn(model: TaskRNN, folder: str | Path, info: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (and ``info``) into ``folder``, created if missing; the folder."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(folder / WEIGHTS_FILE))
    (folder / SHAPE_FILE).write_text(json.dumps(model.shape.to_dict(), indent=2, sort_keys=True), encoding="utf-8")
    if info is not None:
        (folder / INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True, default=str), encoding="utf-8")
    return folder


def load_task_rnn(folder: str | Path) -> tuple[TaskRNN, dict[str, Any]]:
    """The :class:`TaskRNN` saved in ``folder`` (eval mode) and its ``info`` (``{}`` if none)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    for name in (WEIGHTS_FILE, SHAPE_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder} has no {name}: not a saved TaskRNN (expected {WEIGHTS_FILE} and "
                                    f"{SHAPE_FILE})")
    shape = RNNShape.from_dict(json.loads((folder / SHAPE_FILE).read_text(encoding="utf-8")))
    model = TaskRNN(shape)
    model.load_state_dict(load_file(str(folder / WEIGHTS_FILE)))
    model.eval()
    info_path = folder / INFO_FILE
    info = json.loads(info_path.read_text(encoding="utf-8")) if info_path.is_file() else {}
    return model, info
