"""A saved module on disk: one folder holding a JSON configuration beside a safetensors file of tensors.

TaskRNN checkpoints, SAEs, transcoders and trainable interventions all save this way, each under its
own file names (``shape.json`` + ``model.safetensors``, ``cfg.json`` + ``sae_weights.safetensors`` …),
which are kept so that every folder written before, cached or published, still loads. A
:class:`TensorFolder` names a kind's two files and how its JSON is laid out; it writes a folder and
reads one back, with one error for each thing that can be wrong: a missing file is a
FileNotFoundError naming it, a config or weights file that is not one a :class:`FormatError` naming
the file.

    SAE_FOLDER = TensorFolder("cfg.json", "sae_weights.safetensors", "an SAE")
    SAE_FOLDER.write(path, config, sae.state_dict())
    config, tensors = SAE_FOLDER.read(path)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from .formats import FormatError, read_json

if TYPE_CHECKING:
    import torch

__all__ = ["TensorFolder", "load_tensors", "read_tensors", "write_json", "write_tensors"]


@dataclass(frozen=True)
class TensorFolder:
    """The two files one kind of saved module is made of, inside one folder.

    ``config`` and ``weights`` are the file names; ``what`` names the kind with its article for
    messages (``"an SAE"``, ``"a transcoder"``). ``sort_keys`` and ``final_newline`` give the layout
    of the JSON each kind has always written, so saving the same module gives the same bytes.
    """

    config: str
    weights: str
    what: str
    sort_keys: bool = False
    final_newline: bool = False

    @property
    def noun(self) -> str:
        """``what`` without its article: ``"SAE"``."""
        return self.what.split(" ", 1)[-1]

    def write(self, folder: "str | Path", config: Mapping[str, Any], tensors: Mapping[str, "torch.Tensor"]) -> Path:
        """Write ``tensors`` and then ``config`` into ``folder`` (created); the folder."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        write_tensors(folder / self.weights, tensors)
        write_json(folder / self.config, config, sort_keys=self.sort_keys, final_newline=self.final_newline)
        return folder

    def require(self, folder: "str | Path", *, weights: bool = True, hint: str = "") -> tuple[Path, Path]:
        """The paths of the config and weights files; a FileNotFoundError naming the ones ``folder`` lacks
        (the weights file is not asked for with ``weights=False``). ``hint`` is added to the message."""
        folder = Path(folder)
        config_path, weights_path = folder / self.config, folder / self.weights
        needed = [config_path, weights_path] if weights else [config_path]
        missing = [p.name for p in needed if not p.is_file()]
        if missing:
            raise FileNotFoundError(
                f"{folder} is not {self.what} folder: it needs {' and '.join(p.name for p in needed)} and has no "
                f"{' or '.join(missing)}{hint}"
            )
        return config_path, weights_path

    def read_config(self, folder: "str | Path") -> dict[str, Any]:
        """The JSON object in the config file (a FormatError naming the file if it is not one)."""
        return read_json(Path(folder) / self.config, f"{self.what} config")

    def read_weights(self, folder: "str | Path") -> dict[str, "torch.Tensor"]:
        """The tensors in the weights file, on the CPU (a FormatError naming the file if it is not one)."""
        return read_tensors(Path(folder) / self.weights, f"{self.noun} weights")

    def read(self, folder: "str | Path", *, hint: str = "") -> tuple[dict[str, Any], dict[str, "torch.Tensor"]]:
        """The config and the tensors of ``folder``, after :meth:`require`."""
        self.require(folder, hint=hint)
        return self.read_config(folder), self.read_weights(folder)


def write_tensors(path: "str | Path", tensors: Mapping[str, "torch.Tensor"]) -> Path:
    """Write ``tensors`` (detached, contiguous, on the CPU) to the safetensors file ``path``."""
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))
    return Path(path)


def write_json(path: "str | Path", document: Mapping[str, Any], *, sort_keys: bool = False,
               final_newline: bool = False, default: "Callable[[Any], Any] | None" = None) -> Path:
    """Write ``document`` as JSON indented by 2 (UTF-8); ``default`` turns values JSON lacks into ones it has."""
    text = json.dumps(document, indent=2, sort_keys=sort_keys, default=default)
    Path(path).write_text(text + ("\n" if final_newline else ""), encoding="utf-8")
    return Path(path)


def load_tensors(path: "str | Path") -> dict[str, "torch.Tensor"]:
    """The tensors of a ``.safetensors`` file on the CPU; a file with any other suffix is read as a torch
    state dict (``weights_only``), as folders saved without safetensors hold (``weights.pt``). The
    libraries' own errors pass through."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def read_tensors(path: "str | Path", what: str) -> dict[str, "torch.Tensor"]:
    """The tensors of the safetensors file ``path`` (whatever its suffix) on the CPU, which must hold ``what``
    (``"SAE weights"``): a FormatError naming the file when it is not a readable safetensors file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise FormatError(f"{path} is not a safetensors file of {what}: {exc}") from None
