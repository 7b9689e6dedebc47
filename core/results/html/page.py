"""One self-contained HTML document: the shipped script and style sheet inlined, the views as JSON.

Nothing is fetched: no CDN, no font, no image by URL, so a page works offline, from a zip, in an
e-mail. The views sit in a ``<script type="application/json">`` block with ``<``, ``>`` and ``&``
escaped as JSON unicode escapes, so no label can end the block or open a tag.
"""

from __future__ import annotations

import datetime as _datetime
import html
import json
from functools import lru_cache
from importlib import resources
from importlib import metadata
from typing import TYPE_CHECKING, Any, Mapping

from .graph import is_result
from .jsonable import jsonable as _jsonable
from .views import view

if TYPE_CHECKING:
    from ..result import Result

__all__ = ["asset", "document_html", "page_html", "repr_html", "json_script"]

#: Height of the frame a notebook shows a Result in (pixels); the page scrolls inside it.
NOTEBOOK_HEIGHT = 520


@lru_cache(maxsize=None)
def asset(name: str) -> str:
    """The text of a shipped asset (``explorer.js``, ``explorer.css``, ``serve.js``, ...)."""
    return (resources.files(__package__) / "assets" / name).read_text(encoding="utf-8")


def json_script(data: Any, element_id: str) -> str:
    """``data`` as a JSON block that no string inside it can break out of."""
    text = json.dumps(_jsonable(data), allow_nan=False, separators=(",", ":"))
    text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return f'<script type="application/json" id="{html.escape(element_id)}">{text}</script>'


def page_html(
    items: "Mapping[str, Result | Mapping[str, Any]]",
    *,
    title: str = "crosspatch results",
    context: Mapping[str, Any] | None = None,
    links: Mapping[str, str] | None = None,
) -> str:
    """A page drawing every item (a Result or a graph mapping) in order, under ``title``.

    ``context`` is a small table at the top (model, task, seed, versions ...); ``links`` maps a text to
    a relative href shown under the title (e.g. the static report and the data files).
    """
    if not items:
        raise ValueError("page_html needs at least one result")
    views = [view(item, str(name)) for name, item in items.items()]
    data = {"title": title, "context": _jsonable(dict(context or {})), "views": views,
            "links": [{"text": str(k), "href": str(v)} for k, v in (links or {}).items()],
            "footer": f"Written by crosspatch {_version()} on "
                      f"{_datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}."}
    return document_html(title, ["explorer.css"], ["explorer.js"], json_script(data, "cp-data"))


def document_html(title: str, styles: list[str], scripts: list[str], data: str, *, same_origin: bool = False) -> str:
    """The HTML shell: the named assets inlined, ``data`` (a :func:`json_script`) before the scripts. The
    page's policy forbids every fetch, or with ``same_origin`` allows requests to the page's own server."""
    return _PAGE.format(
        title=html.escape(title), css="\n".join(asset(name) for name in styles), data=data,
        scripts="\n".join(f"<script>\n{asset(name)}\n</script>" for name in scripts),
        connect="; connect-src 'self'" if same_origin else "",
    )


def repr_html(result: "Result | Mapping[str, Any]", title: str | None = None) -> str:
    """The page in a sandboxed frame (``srcdoc``), as a notebook shows it: the page's script and style
    stay inside the frame, and it runs without trusting the notebook."""
    name = title if title is not None else _title(result)
    document = page_html({name: result}, title=name)
    return (f'<iframe sandbox="allow-scripts" style="width:100%;height:{NOTEBOOK_HEIGHT}px;border:1px solid #ddd" '
            f'srcdoc="{html.escape(document, quote=True)}"></iframe>')


def _version() -> str:
    try:
        return metadata.version("crosspatch")
    except metadata.PackageNotFoundError:
        return "?"


def _title(result: Any) -> str:
    meta = result.metadata if is_result(result) else result.get("metadata", {})
    parts = [str(meta[k]) for k in ("method", "metric") if meta.get(k)]
    return " · ".join(parts) or "result"


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:{connect}">
<title>{title}</title>
<style>
{css}
</style>
</head>
<body>
<main id="cp-root"></main>
{data}
{scripts}
</body>
</html>
"""
