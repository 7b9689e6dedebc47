"""A model named by a string: a zoo entry, else a local checkpoint folder.

The command line and the workers of a sharded run resolve a name the same way, through these.
Local folders load with transformers (imported only when one is loaded).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from .store import ZooError, ZooModel, load, models

__all__ = ["find_model", "load_local", "load_model", "quiet_transformers"]

logger = logging.getLogger(__name__)


def find_model(spec: str) -> "ZooModel | Path":
    """The zoo entry called ``spec``, else ``spec`` as a local folder; ZooError naming both options."""
    known = models()
    if spec in known:
        return known[spec]
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    raise ZooError(
        f"unknown model {spec!r}: neither a zoo model ({', '.join(sorted(known)) or 'none registered'}) "
        f"nor a local checkpoint folder"
    )


def load_model(spec: str) -> Any:
    """The model ``spec`` names (a zoo model is trained on first use and cached)."""
    found = find_model(spec)
    if isinstance(found, ZooModel):
        return load(spec).model
    return load_local(found)[0]


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def load_local(path: Any) -> tuple[Any, Any]:
    """A local HuggingFace checkpoint and its tokenizer (None when the folder has none): the class its
    config names, else causal LM, masked LM, base model."""
    try:
        import transformers
    except ImportError:
        raise ZooError(
            f"loading the checkpoint folder {path} needs transformers: pip install \"crosspatch[transformers]\""
        ) from None
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ZooError(f"{path} is not a HuggingFace checkpoint folder (no usable config.json): {_one_line(exc)}")
    candidates: list[Any] = [getattr(transformers, a, None) for a in (config.architectures or [])[:1]]
    candidates += [AutoModelForCausalLM, AutoModelForMaskedLM, AutoModel]
    problems = []
    with quiet_transformers():
        for cls in filter(None, candidates):
            try:
                model = cls.from_pretrained(path, local_files_only=True)
                break
            except (ValueError, KeyError) as exc:  # the Auto class has no mapping for this config
                problems.append(f"{cls.__name__}: {_one_line(exc)}")
        else:
            raise ZooError(f"could not load {path} with transformers ({'; '.join(problems)})")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception:  # a folder with weights only: fine for `sites`, `patch` reports it
        logger.debug("no tokenizer in %s", path, exc_info=True)
        tokenizer = None
    return model.eval(), tokenizer


class quiet_transformers:
    """No transformers "Loading weights" bars while a model loads (it takes a blink); a no-op
    without transformers. Training progress (crosspatch's own bars) is not affected."""

    def __enter__(self) -> None:
        try:
            from transformers.utils import logging as hf_logging
        except ImportError:
            self.hf_logging = None
            return
        self.hf_logging = hf_logging
        self.was_enabled = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()

    def __exit__(self, *exc: Any) -> None:
        if self.hf_logging is not None and self.was_enabled:
            self.hf_logging.enable_progress_bar()
