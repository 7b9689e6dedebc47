"""One small module of each kind crosspatch saves as a folder (a JSON config beside a safetensors file), with
weights set by a formula rather than a random draw, so a test can rebuild what a checked-in folder must load to.

``tests/data/saved_modules/<kind>/`` holds each one as the code before the shared folder writer wrote it
(``write_all`` made them); the tests load them with today's code and compare against these builders.
"""

from __future__ import annotations

from pathlib import Path

import torch

DATA = Path(__file__).resolve().parents[1] / "data" / "saved_modules"


def _fill(module: torch.nn.Module) -> torch.nn.Module:
    """Every tensor of ``module``'s state set to a distinct, exactly representable pattern (eighths)."""
    state = {}
    for i, (name, value) in enumerate(module.state_dict().items()):
        n = value.numel()
        pattern = (torch.arange(n, dtype=torch.float64) * (i + 3) % 17 - 8) / 8
        state[name] = pattern.reshape(value.shape).to(value.dtype)
    module.load_state_dict(state)
    return module


def task_rnn() -> torch.nn.Module:
    from crosspatch.zoo.algorithmic.rnn import RNNShape, TaskRNN

    return _fill(TaskRNN(RNNShape(2, 3, 2, (4,), (), "classes"))).eval()


RNN_INFO = {"task": "parity-last2", "success": True, "accuracy": 1.0, "shape": {"hidden_dim": 3}}


def sae() -> torch.nn.Module:
    from crosspatch.trainable.sae import SAE

    return _fill(SAE(4, 6, "topk", k=2, metadata={"site": "resid_post.1", "train": {"steps": 3}},
                     rescale_by_decoder_norm=True))


def transcoder() -> torch.nn.Module:
    from crosspatch.trainable.transcoder import Transcoder

    return _fill(Transcoder(3, 3, 5, ["mlp_in.0", "mlp_in.1"], ["mlp_out.0", "mlp_out.1"], cross_layer=True,
                            kind="jumprelu", skip=True, metadata={"base": "a-test-model"}))


def trainable() -> torch.nn.Module:
    from crosspatch.trainable.das import RotatedSubspace

    return _fill(RotatedSubspace(6, 2, seed=1))


KINDS = ("task_rnn", "sae", "transcoder", "trainable")


def build(kind: str) -> torch.nn.Module:
    return {"task_rnn": task_rnn, "sae": sae, "transcoder": transcoder, "trainable": trainable}[kind]()


def save(kind: str, module: torch.nn.Module, folder: Path) -> Path:
    """``module`` saved the way its kind is saved (the public save function of each)."""
    if kind == "task_rnn":
        from crosspatch.zoo.algorithmic.checkpoint import save_task_rnn

        return save_task_rnn(module, folder, info=RNN_INFO)
    return module.save(folder)


def load(kind: str, folder: Path) -> torch.nn.Module:
    """The module in ``folder``, read the way its kind is read."""
    if kind == "task_rnn":
        from crosspatch.zoo.algorithmic.checkpoint import load_task_rnn

        model, info = load_task_rnn(folder)
        assert info == RNN_INFO
        return model
    if kind == "sae":
        from crosspatch.trainable.sae import load_sae

        return load_sae(folder)
    if kind == "transcoder":
        from crosspatch.trainable.transcoder import load_transcoder

        return load_transcoder(folder)
    from crosspatch.trainable.base import load as load_trainable

    return load_trainable(folder)


def write_all(root: Path = DATA) -> None:
    """Write one folder per kind under ``root`` (how tests/data/saved_modules was made)."""
    for kind in KINDS:
        save(kind, build(kind), root / kind)
