"""Inputs and outputs shared by the two-tower (CLIP-style) adapters: open_clip and HuggingFace CLIPModel.

This module imports neither open_clip nor transformers; both adapters use it, so one study runs on
either library's model with the same inputs and gets the same outputs.

**Inputs.** A dict with ``"images"`` (``[n, 3, H, W]`` floats, already preprocessed) and/or
``"texts"`` (``[m, ctx]`` token ids); HuggingFace names ``"pixel_values"`` and ``"input_ids"`` are
accepted as aliases. A bare tensor is read by its type: 4-D floats are images, 2-D integers texts.

**Rows and candidates.** When both towers run, one tower's inputs are the *rows* of the run: the
batch axis the engine sweeps, tiles and binds interventions to. The other tower's inputs are the
*candidates* each row is scored against, encoded once per forward and never tiled. Images are the
rows by default (open_clip's ``logits_per_image``); pass ``"rows": "texts"`` to make the captions
the rows (``logits_per_text``). Sites of the candidate tower see the candidates as their batch:
capture them, or intervene on them for every row at once (interventions bound to rows belong on
the rows tower). With ``"rows": "pairs"`` image ``i`` and text ``i`` form row ``i`` (equal counts):
both towers are rows, every site of both has one activation per row, and ``logits`` is ``[n, 1]``,
the score of each pair.

**Outputs.** ``image_embed`` and ``text_embed`` are the projected, *unnormalised* embeddings
(``encode_image`` / ``encode_text``); ``logits[row, candidate]`` is
``logit_scale.exp() * cos(row, candidate)`` (``+ logit_bias`` when the model has one), exactly as
open_clip scores image-text pairs. The primary output of a run is ``logits`` when both towers run,
else the embedding of the one that ran.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from crosspatch.engine.reach import installing

__all__ = [
    "Candidates", "TwoTowerOutput", "Tap", "taps_for", "prepare_inputs", "split_inputs", "sizes",
    "run_towers", "score", "is_two_tower_inputs", "HEAD_IN_DOC", "MLP_IN_DOC", "LOGITS_IN_DOC", "HEAD_Z_DOC",
]

# The receiver-input families of each tower (the receivers of an edge graph), the same on both libraries.
HEAD_IN_DOC = (
    "residual each head's query/key/value projection reads, before the block's input norm "
    "(captured: the block input in every slot; a written slot is normalised and projected on its own)"
)
HEAD_Z_DOC = "each head's attention-weighted values, the output projection's input"
MLP_IN_DOC = "residual the MLP reads, before its norm (resid_mid; writing it changes the MLP's input only)"
LOGITS_IN_DOC = {
    "vision": "residual leaving the last block at every position, what the readout reads (it pools position 0, "
              "then normalises); positions other than the pooled one do not reach the embedding",
    "text": "final norm's input: the residual leaving the last block at every position (normalised, then "
            "pooled at the end token)",
}

IMAGE_KEYS = ("images", "pixel_values")
TEXT_KEYS = ("texts", "input_ids")
ROWS_KEY = "rows"


@dataclass(frozen=True)
class Candidates:
    """A tower's inputs held as candidates: not a tensor, so the engine neither tiles nor counts them
    as the batch. ``{"images": x, "texts": Candidates(ids)}`` is what ``{"images": x, "texts": ids}``
    prepares to."""

    tensor: torch.Tensor

    def __len__(self) -> int:
        return self.tensor.shape[0]


@dataclass
class TwoTowerOutput:
    """The raw output of a two-tower run. ``primary`` is what the engine and metrics see."""

    image_embed: torch.Tensor | None
    text_embed: torch.Tensor | None
    logits: torch.Tensor | None
    rows: str  # "images", "texts" or "pairs"

    @property
    def primary(self) -> torch.Tensor:
        if self.logits is not None:
            return self.logits
        return self.image_embed if self.image_embed is not None else self.text_embed


class _TapHandle:
    def __init__(self, callbacks: list, callback: Callable):
        self.callbacks, self.callback = callbacks, callback

    def remove(self) -> None:
        for i, cb in enumerate(self.callbacks):
            if cb is self.callback:
                del self.callbacks[i]
                return


class Tap:
    """A reach for a value the adapter computes outside any module (embeddings, logits).

    The adapter's forward passes the value through the tap; every installed callback may read or
    replace it, in installation order.
    """

    def __init__(self) -> None:
        self._callbacks: list[Callable] = []

    def install(self, layer: int | None, callback: Callable) -> list[_TapHandle]:
        with installing() as changes:
            changes.add(_TapHandle(self._callbacks, callback))  # before the callback is added
            self._callbacks.append(callback)
            return changes.handles

    def __call__(self, value: torch.Tensor) -> torch.Tensor:
        for callback in tuple(self._callbacks):
            new = callback(value)
            if new is not None:
                value = new
        return value


_TAPS: "weakref.WeakKeyDictionary[nn.Module, dict[str, Tap]]" = weakref.WeakKeyDictionary()


def taps_for(model: nn.Module) -> dict[str, Tap]:
    """The output taps of one model (``image_embed``, ``text_embed``, ``logits``), created once."""
    taps = _TAPS.get(model)
    if taps is None:
        taps = {name: Tap() for name in ("image_embed", "text_embed", "logits")}
        _TAPS[model] = taps
    return taps


def _first(inputs: Mapping[str, Any], keys: tuple[str, ...]) -> tuple[str | None, Any]:
    found = [k for k in keys if k in inputs and inputs[k] is not None]
    if len(found) > 1:
        raise ValueError(f"inputs give both {found[0]!r} and {found[1]!r}; they name the same tower, give one")
    return (found[0], inputs[found[0]]) if found else (None, None)


def is_two_tower_inputs(inputs: Any) -> bool:
    return isinstance(inputs, Mapping) and any(k in inputs for k in ("images", "texts", ROWS_KEY))


def prepare_inputs(inputs: Any, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Normalise user inputs: ``{"images": rows, "texts": Candidates(...)}`` (rows first), on the
    model's device, images in the model's floating dtype, token ids as int64."""
    if isinstance(inputs, torch.Tensor):
        if inputs.is_floating_point() and inputs.ndim in (3, 4):
            inputs = {"images": inputs}
        elif not inputs.is_floating_point() and inputs.ndim in (1, 2):
            inputs = {"texts": inputs}
        else:
            raise ValueError(
                f"a bare tensor input must be images [n, 3, H, W] (floats) or token ids [m, ctx] (integers); "
                f"got {inputs.dtype} of shape {tuple(inputs.shape)}. Pass a dict {{'images': ..., 'texts': ...}}"
            )
    if not isinstance(inputs, Mapping):
        raise TypeError(f"CLIP inputs are a dict with 'images' and/or 'texts' (token ids); got {type(inputs).__name__}")
    unknown = set(inputs) - set(IMAGE_KEYS) - set(TEXT_KEYS) - {ROWS_KEY}
    if unknown:
        raise ValueError(
            f"unknown CLIP input keys {sorted(unknown)}; expected 'images' ([n, 3, H, W]) and/or 'texts' "
            f"(token ids [m, ctx]), optionally 'rows': 'images' | 'texts'. No attention mask is needed: "
            f"the text tower is causal, so padding after the end token never reaches the pooled embedding"
        )
    _, images = _first(inputs, IMAGE_KEYS)
    _, texts = _first(inputs, TEXT_KEYS)
    if images is None and texts is None:
        raise ValueError("CLIP inputs need 'images' ([n, 3, H, W]) and/or 'texts' (token ids [m, ctx])")

    rows = inputs.get(ROWS_KEY)
    if rows is None:
        if isinstance(images, Candidates) and not isinstance(texts, Candidates) and texts is not None:
            rows = "texts"
        elif images is None:
            rows = "texts"
        else:
            rows = "images"
    if rows not in ("images", "texts", "pairs"):
        raise ValueError(f"'rows' must be 'images', 'texts' or 'pairs', got {rows!r}")
    if rows == "pairs" and (images is None or texts is None):
        raise ValueError("'rows' is 'pairs' but the inputs do not have both images and texts")
    if (rows == "images" and images is None) or (rows == "texts" and texts is None):
        raise ValueError(f"'rows' is {rows!r} but the inputs have no {rows}")

    def tensor(value: Any, what: str) -> torch.Tensor:
        value = value.tensor if isinstance(value, Candidates) else value
        value = value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
        if what == "images":
            if value.ndim == 3:
                value = value.unsqueeze(0)
            if value.ndim != 4:
                raise ValueError(f"images must be [n, channels, height, width]; got shape {tuple(value.shape)}")
            return value.to(device=device, dtype=dtype)
        if value.is_floating_point():
            raise ValueError(f"texts must be token ids (integers), got {value.dtype}; tokenize the captions first")
        if value.ndim == 1:
            value = value.unsqueeze(0)
        if value.ndim != 2:
            raise ValueError(f"texts must be token ids [m, ctx]; got shape {tuple(value.shape)}")
        return value.to(device=device, dtype=torch.long)

    out: dict[str, Any] = {}
    order = ("texts", "images") if rows == "texts" else ("images", "texts")
    for name in order:
        value = images if name == "images" else texts
        if value is None:
            continue
        t = tensor(value, name)
        out[name] = t if rows in (name, "pairs") else Candidates(t)
    if rows == "pairs" and out["images"].shape[0] != out["texts"].shape[0]:
        raise ValueError(
            f"'rows': 'pairs' pairs image i with text i, but there are {out['images'].shape[0]} images and "
            f"{out['texts'].shape[0]} texts"
        )
    out[ROWS_KEY] = rows  # not a tensor: the engine neither tiles nor counts it; preparing again keeps the mode
    return out


def split_inputs(inputs: Mapping[str, Any]) -> tuple[torch.Tensor | None, torch.Tensor | None, str]:
    """(images, texts, rows) of prepared inputs."""
    def unwrap(v):
        return v.tensor if isinstance(v, Candidates) else v

    raw_images, raw_texts = inputs.get("images"), inputs.get("texts")
    rows = inputs.get(ROWS_KEY)
    if rows is None:
        if isinstance(raw_images, torch.Tensor) and isinstance(raw_texts, torch.Tensor):
            rows = "pairs"
        else:
            rows = "images" if isinstance(raw_images, torch.Tensor) else "texts"
    return unwrap(raw_images), unwrap(raw_texts), rows


def sizes(inputs: Mapping[str, Any]) -> dict[str, int]:
    """Input-dependent axis sizes: text positions and the number of candidates."""
    images, texts, rows = split_inputs(inputs)
    out: dict[str, int] = {}
    if texts is not None:
        out["pos"] = out["key_pos"] = texts.shape[1]
    if images is not None and texts is not None:
        out["candidate"] = 1 if rows == "pairs" else (texts if rows == "images" else images).shape[0]
    return out


def score(rows: torch.Tensor, candidates: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor | None):
    """``logit_scale.exp() * cos(row, candidate)`` (+ bias), as open_clip computes image-text logits."""
    logits = logit_scale.exp() * F.normalize(rows, dim=-1) @ F.normalize(candidates, dim=-1).T
    if logit_bias is not None:
        logits = logits + logit_bias
    return logits


def run_towers(
    model: nn.Module,
    inputs: Mapping[str, Any],
    encode_image: Callable[[torch.Tensor], torch.Tensor],
    encode_text: Callable[[torch.Tensor], torch.Tensor],
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor | None = None,
) -> TwoTowerOutput:
    """Encode what the inputs hold, pass embeddings and logits through the model's taps."""
    taps = taps_for(model)
    images, texts, rows = split_inputs(inputs)
    image_embed = taps["image_embed"](encode_image(images)) if images is not None else None
    text_embed = taps["text_embed"](encode_text(texts)) if texts is not None else None
    logits = None
    if image_embed is not None and text_embed is not None:
        if rows == "pairs":
            cos = (F.normalize(image_embed, dim=-1) * F.normalize(text_embed, dim=-1)).sum(dim=-1, keepdim=True)
            logits = logit_scale.exp() * cos + (0 if logit_bias is None else logit_bias)
        else:
            row, cand = (image_embed, text_embed) if rows == "images" else (text_embed, image_embed)
            logits = score(row, cand, logit_scale, logit_bias)
        logits = taps["logits"](logits)
    return TwoTowerOutput(image_embed, text_embed, logits, rows)
