"""Reading the JSON files crosspatch writes (results, trainable interventions, SAE folders) with one
error for everything that is wrong in them: :class:`FormatError` names the file and the field.

A file that is not UTF-8, not JSON, not an object, or whose field has the wrong type would otherwise
surface as whatever Python error the first use of the bad value raises.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["FormatError", "read_json", "read_versioned", "json_field"]

_MISSING = object()


class FormatError(ValueError):
    """A file crosspatch reads is malformed: the message names the file and the field."""


def read_json(path: "str | Path", what: str) -> dict[str, Any]:
    """The JSON object in ``path``; ``what`` says what the file should be (``"a crosspatch result"``)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise FormatError(f"{path} is not {what}: it is not UTF-8 text (byte {exc.start})") from None
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise FormatError(f"{path} is not {what}: invalid JSON at line {exc.lineno} column {exc.colno} ({exc.msg})") from None
    if not isinstance(document, dict):
        raise FormatError(f"{path} is not {what}: it holds a JSON {type(document).__name__}, not an object")
    return document


def read_versioned(path: "str | Path", what: str, fmt: str, version_field: str, readable: int) -> dict[str, Any]:
    """:func:`read_json` of a file whose ``format`` field must be ``fmt`` and whose ``version_field`` (an
    integer, 0 when absent) at most ``readable``."""
    document = read_json(path, what)
    if document.get("format") != fmt:
        raise FormatError(f"{path} is not {what}: field 'format' is {document.get('format')!r}, expected {fmt!r}")
    version = json_field(document, version_field, int, path, 0)
    if version > readable:
        raise FormatError(f"{path} has format version {version}; this crosspatch reads up to {readable}")
    return document


def json_field(document: dict[str, Any], name: str, kind: "type | tuple[type, ...]", path: "str | Path",
          default: Any = _MISSING) -> Any:
    """``document[name]``, checked to be of ``kind`` (``default`` when absent, if given)."""
    if name not in document:
        if default is not _MISSING:
            return default
        raise FormatError(f"{path}: field {name!r} is missing")
    value = document[name]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        expected = " or ".join(_json_name(k) for k in kinds)
        raise FormatError(f"{path}: field {name!r} should be {expected}, got {_json_name(type(value))} {_short(value)}")
    return value


def _json_name(kind: type) -> str:
    return {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number",
            bool: "true or false", type(None): "null"}.get(kind, kind.__name__)


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
