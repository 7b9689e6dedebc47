"""A model named by a string: a zoo entry, else a local checkpoint folder.

The command line, ``crosspatch.wrap("ioi-gpt2-tiny")`` and the workers of a sharded run resolve a
name the same way, through these. Local folders load with transformers (imported only when one is
loaded), together with their tokenizer when the folder holds one; :func:`build_causal_lm` makes a
randomly initialised transformers model from a config given as data, for zoo entries trained here.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .store import ZooError, ZooModel, did_you_mean, load, models

if TYPE_CHECKING:
    from ..engine.model import WrappedModel

__all__ = ["build_causal_lm", "find_model", "load_local", "load_model", "quiet_transformers", "tokenizer_files", "wrap"]

logger = logging.getLogger(__name__)

#: Files one of which a checkpoint folder's tokenizer is saved in (``save_pretrained`` writes some of them).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model",
    "spiece.model", "sentencepiece.bpe.model",
)


def find_model(spec: "str | os.PathLike") -> "ZooModel | Path":
    """The zoo entry called ``spec``, else ``spec`` as a local folder; ZooError naming both options
    (with the closest zoo name when it looks like a typo, and saying so when a path does not exist)."""
    spec = os.fspath(spec)
    if not spec.strip():
        raise ZooError("unknown model '': give a zoo name ('crosspatch zoo list') or a checkpoint folder")
    known = models()
    if spec in known:
        return known[spec]
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    zoo = ", ".join(sorted(known)) or "none registered"
    if path.exists():
        raise ZooError(f"unknown model {spec!r}: {path} is a file, not a checkpoint folder (zoo models: {zoo})")
    if _looks_like_path(spec):
        raise ZooError(f"unknown model {spec!r}: there is no folder {path} (and no zoo model of that name; the zoo has: {zoo})")
    raise ZooError(
        f"unknown model {spec!r}{did_you_mean(spec, known)}: neither a zoo model ({zoo}) nor a local checkpoint folder"
    )


def _looks_like_path(spec: str) -> bool:
    return os.sep in spec or "/" in spec or spec.startswith((".", "~")) or spec.endswith((".json", ".safetensors"))


def wrap(
    model: Any,
    adapter: Any = None,
    *,
    tokenizer: Any = None,
    train_ok: bool = False,
    device: Any = None,
    dtype: Any = None,
    seed: int = 0,
) -> "WrappedModel":
    """``crosspatch.wrap``: wrap a module, or load a zoo model or a local checkpoint folder by name
    together with its tokenizer (a zoo model is trained on first use and cached).

    ``tokenizer`` overrides the one that comes with the model; ``device`` and ``dtype`` move a model
    loaded by name; ``seed`` picks a zoo model's build. Everything else is
    :func:`crosspatch.engine.model.wrap`: adapter lookup, eval mode unless ``train_ok``.
    """
    from ..engine.model import wrap as wrap_module  # torch: not for the command line's --help

    if not isinstance(model, (str, os.PathLike)):
        return wrap_module(model, adapter, tokenizer=tokenizer, train_ok=train_ok)
    found = find_model(model)
    missing = None
    if isinstance(found, ZooModel):
        loaded = load(found.name, device=device, dtype=dtype, seed=seed)
        module, own = loaded.model, loaded.tokenizer
        if own is None:
            missing = f"zoo model {found.name!r} comes without a tokenizer (its inputs are not text)"
    else:
        module, own = load_local(found)
        if device is not None or dtype is not None:
            module = module.to(device=device, dtype=dtype)
        if own is None:
            missing = f"the checkpoint folder {found} {tokenizer_files(found)}; save one there (tokenizer.save_pretrained(folder))"
    m = wrap_module(module, adapter, tokenizer=tokenizer if tokenizer is not None else own, train_ok=train_ok)
    if m.tokenizer is None:
        m.no_tokenizer = missing
    return m


def tokenizer_files(folder: "str | Path") -> str:
    """What a folder holds of a tokenizer, in words (for errors about a folder without one)."""
    present = [name for name in TOKENIZER_FILES if (Path(folder) / name).is_file()]
    if present:
        return f"holds no usable tokenizer (only {', '.join(present)})"
    return f"holds no tokenizer (none of {', '.join(TOKENIZER_FILES[:4])} ...)"


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
    tokenizer = None
    if any((Path(path) / name).is_file() for name in TOKENIZER_FILES):
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception:  # an unreadable tokenizer: fine for `sites`, text inputs report it
            logger.debug("no usable tokenizer in %s", path, exc_info=True)
        if tokenizer is not None and not _has_vocabulary(tokenizer):
            tokenizer = None
    else:  # transformers would make an empty tokenizer of the config's class: every text would be 0 tokens
        logger.debug("no tokenizer files in %s", path)
    return model.eval(), tokenizer


def build_causal_lm(config: dict[str, Any]) -> Any:
    """A randomly initialised transformers causal LM of ``config`` (``model_type`` and the config's fields)."""
    try:
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError:
        raise ZooError("building a transformers model needs transformers: pip install \"crosspatch[transformers]\"") from None
    fields = dict(config)
    model_type = fields.pop("model_type", None)
    if model_type is None:
        raise ZooError(f"a model config needs its model_type (e.g. 'gpt2'); got the fields {sorted(fields)}")
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **fields))


def _has_vocabulary(tokenizer: Any) -> bool:
    """False for a tokenizer whose vocabulary holds nothing but special tokens."""
    try:
        size = len(tokenizer)
        special = len(set(getattr(tokenizer, "all_special_ids", []) or []))
    except Exception:
        return True
    return size > special


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
