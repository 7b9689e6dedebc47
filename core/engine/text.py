"""Text in, tokens out: turning prompts into the ids a model reads, with any tokenizer.

The tokenizer is an object the user (or the zoo) hands over; nothing here imports a tokenizer
library. It is duck-typed: a HuggingFace tokenizer, a ``tokenizers.Tokenizer`` or anything with
``encode(text) -> ids`` (a list of ints, or an object with ``.ids``) and ``decode(ids) -> str``
works. Prompts are encoded with the tokenizer's own special tokens (what the model was trained
with: BERT's ``[CLS]`` … ``[SEP]``), answers without them.

Errors that concern the tokenisation show it: :class:`TokenizationError` lists the tokens of
the texts involved side by side.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

__all__ = [
    "TokenizationError", "is_text", "encode", "encode_batch", "str_tokens", "single_token", "side_by_side",
    "check_same_lengths", "position_labels",
]


class TokenizationError(ValueError):
    """Text that does not tokenize as a method needs: a word the vocabulary lacks, an answer of
    several tokens, paired prompts of different lengths, or no tokenizer at all."""


def is_text(value: Any) -> bool:
    """A string, or a non-empty list or tuple of strings."""
    if isinstance(value, str):
        return True
    return isinstance(value, (list, tuple)) and len(value) > 0 and all(isinstance(v, str) for v in value)


def _ids(encoded: Any) -> list[int]:
    if hasattr(encoded, "ids"):  # tokenizers.Encoding
        encoded = encoded.ids
    elif isinstance(encoded, dict) or hasattr(encoded, "keys"):  # BatchEncoding
        encoded = encoded["input_ids"]
    if isinstance(encoded, torch.Tensor):
        encoded = encoded.reshape(-1).tolist()
    return [int(i) for i in encoded]


def encode(tokenizer: Any, text: str, *, special: bool = True) -> list[int]:
    """The ids of ``text``; ``special``: with the tokenizer's special tokens (a prompt), else without (an answer)."""
    if tokenizer is None:
        raise TokenizationError(
            f"text input {text!r} needs a tokenizer: wrap the model with one, cp.wrap(model, tokenizer=tok), "
            f"or pass token ids"
        )
    method = getattr(tokenizer, "encode", None)
    if method is None and callable(tokenizer):
        method = tokenizer
    if method is None:
        raise TypeError(
            f"the tokenizer {type(tokenizer).__name__} has no encode(text) and is not callable; a tokenizer turns a "
            f"string into token ids (a HuggingFace tokenizer, a tokenizers.Tokenizer, or any object with encode/decode)"
        )
    try:
        encoded = method(text, add_special_tokens=special)
    except TypeError:  # an encode without that keyword
        encoded = method(text)
    ids = _ids(encoded)
    _check_known(tokenizer, text, ids)
    return ids


def encode_batch(tokenizer: Any, texts: "str | Sequence[str]") -> dict[str, torch.Tensor]:
    """``input_ids`` ``[batch, pos]`` for one text or a list; texts of different lengths are padded on the
    tokenizer's ``padding_side`` (right unless it says left) and get an ``attention_mask``."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    rows = [encode(tokenizer, t) for t in texts]
    empty = [t for t, r in zip(texts, rows) if not r]
    if empty:
        raise TokenizationError(f"text {empty[0]!r} tokenizes to no tokens; a prompt needs at least one")
    width = max(len(r) for r in rows)
    if all(len(r) == width for r in rows):
        return {"input_ids": torch.tensor(rows, dtype=torch.long)}
    pad = _pad_id(tokenizer)
    left = getattr(tokenizer, "padding_side", "right") == "left"
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        cols = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, cols] = torch.tensor(row, dtype=torch.long)
        mask[i, cols] = 1
    return {"input_ids": ids, "attention_mask": mask}


def str_tokens(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """Each id decoded on its own (``' Mary'``); ids the tokenizer cannot decode show as ``<id>``."""
    decode = getattr(tokenizer, "decode", None)
    if decode is None:
        raise TypeError(f"the tokenizer {type(tokenizer).__name__} has no decode(ids); it cannot show tokens")
    out = []
    for i in ids:
        try:
            out.append(str(decode([int(i)])))
        except Exception:  # an id outside the vocabulary
            out.append(f"<{int(i)}>")
    return out


def single_token(tokenizer: Any, text: str, what: str) -> int:
    """The one id of an answer ``text``, or a TokenizationError that shows how it tokenizes."""
    ids = encode(tokenizer, text, special=False)
    if len(ids) == 1:
        return ids[0]
    shown = ", ".join(repr(t) for t in str_tokens(tokenizer, ids)) if ids else "nothing"
    hint = " (a next word usually starts with a space: ' Mary')" if not text.startswith(" ") else ""
    raise TokenizationError(
        f"{what} {text!r} is {len(ids)} tokens for this tokenizer: [{shown}]; the metric scores one next "
        f"token, so give a single-token {what}{hint} or token ids"
    )


def side_by_side(tokenizer: Any, columns: dict[str, Sequence[int]]) -> str:
    """A table of the tokens of several id lists, one column each, position by position."""
    names = list(columns)
    tokens = {name: [repr(t) for t in str_tokens(tokenizer, ids)] for name, ids in columns.items()}
    rows = max(len(t) for t in tokens.values())
    widths = {name: max([len(name), *(len(t) for t in tokens[name])]) for name in names}
    lines = ["  pos  " + "  ".join(name.ljust(widths[name]) for name in names)]
    for p in range(rows):
        cells = []
        for name in names:
            cell = tokens[name][p] if p < len(tokens[name]) else "-"
            cells.append(cell.ljust(widths[name]))
        lines.append(f"  {p:>3}  " + "  ".join(cells).rstrip())
    return "\n".join(lines)


def check_same_lengths(tokenizer: Any, clean: "str | Sequence[str]", corrupt: "str | Sequence[str]") -> None:
    """Clean and corrupt texts are paired row by row and position by position: each pair must tokenize
    to the same length. The error shows the first pair that does not, side by side."""
    a = [clean] if isinstance(clean, str) else list(clean)
    b = [corrupt] if isinstance(corrupt, str) else list(corrupt)
    if len(a) != len(b):
        raise TokenizationError(
            f"{len(a)} clean texts but {len(b)} corrupt texts; they are paired row by row, so give as many of each"
        )
    for row, (x, y) in enumerate(zip(a, b)):
        ids_x, ids_y = encode(tokenizer, x), encode(tokenizer, y)
        if len(ids_x) != len(ids_y):
            where = f" (pair {row})" if len(a) > 1 else ""
            raise TokenizationError(
                f"clean and corrupt texts tokenize to {len(ids_x)} and {len(ids_y)} tokens{where}; patching pairs "
                f"them position by position:\n{side_by_side(tokenizer, {'clean': ids_x, 'corrupt': ids_y})}\n"
                f"Align the prompts (words that are one token each, e.g. names with a leading space), or pad them "
                f"yourself and pass input_ids with an attention_mask."
            )


# ------------------------------------------------------------------ internals


def _pad_id(tokenizer: Any) -> int:
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    return 0


def _unknown_id(tokenizer: Any) -> int | None:
    """The unknown-token id when it means "not in the vocabulary" (GPT-2's unk is its end-of-text token,
    which a prompt may hold on purpose)."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if not isinstance(unk, int):
        return None
    if unk in {getattr(tokenizer, n, None) for n in ("bos_token_id", "eos_token_id", "pad_token_id")}:
        return None
    return unk


def _check_known(tokenizer: Any, text: str, ids: list[int]) -> None:
    unk = _unknown_id(tokenizer)
    if unk is None or unk not in ids:
        return
    words = _unknown_words(tokenizer, text, ids, unk)
    named = ", ".join(repr(w) for w in words) if words else f"{ids.count(unk)} word(s)"
    raise TokenizationError(
        f"the tokenizer does not know {named} in {text!r}: the model would read its unknown token there; use "
        f"words of its vocabulary (a zoo model knows the words of its task)"
    )


def _unknown_words(tokenizer: Any, text: str, ids: list[int], unk: int) -> list[str]:
    try:
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets, found = encoded["offset_mapping"], encoded["input_ids"]
    except Exception:  # not a fast HuggingFace tokenizer: no offsets to name the words by
        return []
    return list(dict.fromkeys(text[a:b] for (a, b), i in zip(offsets, found) if i == unk))


def position_labels(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """``"3 John"``-style labels, one per position: the index (labels stay unique) and the token."""
    labels = []
    for i, token in enumerate(str_tokens(tokenizer, ids)):
        labels.append(f"{i} {token.strip() or repr(token)}")
    return labels
