"""A one-page HTML report for a set of results, with a heatmap, JSON and CSV per result.

    from crosspatch.report import write_report
    write_report({"resid_pre": res1, "heads": res2}, Path("crosspatch-out"),
                 title="IOI on ioi-gpt2-tiny", context={"model": "ioi-gpt2-tiny", "task": "ioi"})

The folder then holds ``<name>.png``, ``<name>.json`` (:meth:`Result.save`), ``<name>.csv``
(:meth:`Result.to_csv`) per result, ``index.html``, which links them by relative paths (no scripts,
no external resources), and ``explorer.html``, the interactive page (hover values, per-prompt
breakdowns, attention patterns, edge graphs with a pruning slider; :mod:`crosspatch.results.html`),
one file with its script inlined. The folder can be moved, zipped or served as it is.
"""

from __future__ import annotations

import datetime as _datetime
import html
import json
import logging
import math
import re
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import quote

import numpy as np

from .html.graph import is_graph
from .html.page import page_html
from .result import Result, collect_versions
from ..sites.site import ANY, Site, SiteError

__all__ = ["write_report", "top_sites", "file_stems", "EXPLORER"]

logger = logging.getLogger(__name__)

TOP_K = 5
#: The interactive page's file name in a report folder.
EXPLORER = "explorer.html"
_DPI = 110


def write_report(
    results: Mapping[str, Result],
    out: str | Path,
    *,
    title: str,
    context: Mapping[str, Any] = {},
    graphs: Mapping[str, Mapping[str, Any]] = {},
    pictures: bool = True,
) -> Path:
    """Write every result as PNG, JSON and CSV plus ``index.html`` and ``explorer.html`` into ``out``;
    return ``out``.

    ``graphs`` adds graphs in the generic ``{nodes, links}`` schema to the interactive page only
    (each also saved as ``<name>.graph.json``); an edge Result among ``results`` is drawn as a graph.
    ``pictures=False`` skips the PNGs (matplotlib takes about a second a picture; the pages still draw).

    ``context`` is shown as a small table at the top (model, task, prompts, metric, seed,
    versions, ... -- any keys; nested mappings are shown as ``key value`` lists). Result names
    become file names (characters other than letters, digits, ``.``, ``_`` and ``-`` are replaced).
    Results that are not 1-D or 2-D get no picture; their JSON, CSV and top sites are written.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if not results:
        raise ValueError("write_report needs at least one result")
    stems = file_stems(list(results))
    sections = []
    for name, result in results.items():
        if not isinstance(result, Result):
            raise TypeError(f"result {name!r} is a {type(result).__name__}, not a crosspatch Result")
        stem = stems[name]
        files = {"json": result.save(out / f"{stem}.json").name, "csv": result.to_csv(out / f"{stem}.csv").name}
        if result.values.ndim in (1, 2) and pictures:
            figure = result.plot()
            figure.savefig(out / f"{stem}.png", dpi=_DPI)
            files["png"] = f"{stem}.png"
        elif pictures:
            logger.info("result %r has %d dims; no plot in the report", name, result.values.ndim)
        sections.append(_section(name, result, files))
    for name, graph in graphs.items():
        if not is_graph(graph):
            raise TypeError(f"graph {name!r} is not a mapping with 'nodes' and 'links' lists")
        (out / f"{file_stems([name])[name]}.graph.json").write_text(json.dumps(graph), encoding="utf-8")
    (out / EXPLORER).write_text(
        page_html({**results, **graphs}, title=title, context=_explorer_context(context),
                  links={"static report": "index.html"}),
        encoding="utf-8",
    )
    page = _PAGE.format(
        title=_e(title),
        explorer=_e(EXPLORER),
        context=_context_table(context),
        sections="\n".join(sections),
        footer=_e(
            f"Written by crosspatch {collect_versions().get('crosspatch', '?')} on "
            f"{_datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}. Each result is also saved as JSON "
            f"(crosspatch.Result.load) and CSV (one row per site)."
        ),
    )
    index = out / "index.html"
    index.write_text(page, encoding="utf-8")
    logger.info("wrote report %s", index)
    return out


def top_sites(result: Result, k: int = TOP_K) -> list[dict[str, Any]]:
    """The ``k`` entries with the largest absolute value, largest first (NaN never ranks).

    Each row has ``site`` (the concrete site string when it can be rebuilt from the result's
    ``sites`` metadata, else ``None``), one key per dim with its coordinate label, and ``value``.
    """
    values = result.values
    if values.ndim == 0:
        return [{"site": None, "value": float(values)}]
    flat = values.reshape(-1)
    finite = np.flatnonzero(~np.isnan(flat))
    order = finite[np.argsort(-np.abs(flat[finite]), kind="stable")][:k]
    rows = []
    for i in order:
        index = np.unravel_index(int(i), values.shape)
        row: dict[str, Any] = {"site": _site_string(result, tuple(int(j) for j in index))}
        for dim, j in zip(result.dims, index):
            row[dim] = result.coords[dim][int(j)]
        row["value"] = float(flat[i])
        rows.append(row)
    return rows


# ------------------------------------------------------------------- pieces


def file_stems(names: list[str]) -> dict[str, str]:
    """Each result name's file stem in a report folder (letters, digits, ``.``, ``_``, ``-``; unique)."""
    stems: dict[str, str] = {}
    used: set[str] = {"index"}
    for name in names:
        base = re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).strip("._-") or "result"
        stem, n = base, 2
        while stem.lower() in used:
            stem, n = f"{base}_{n}", n + 1
        used.add(stem.lower())
        stems[name] = stem
    return stems


def _site_string(result: Result, index: tuple[int, ...]) -> str | None:
    """Rebuild the concrete site of one entry from the sweep pattern in the metadata."""
    if result.dims == ("site",):
        return str(result.coords["site"][index[0]])
    pattern = result.metadata.get("sites")
    if not isinstance(pattern, str):
        return None
    try:
        site = Site.parse(pattern)
    except SiteError:
        return None
    at = dict(zip(result.dims, index))
    layer = site.layer
    if layer == ANY:
        if "layer" not in at:
            return None
        layer = at.pop("layer")
    selection = {}
    for axis, value in site.sel:
        if value == ANY:
            if axis not in at:
                return None
            value = at.pop(axis)
        selection[axis] = value
    if at:
        return None
    try:
        return str(Site(site.family, layer, tuple(selection.items())))
    except SiteError:  # pragma: no cover - defensive
        return None


def _section(name: str, result: Result, files: Mapping[str, str]) -> str:
    meta = result.metadata
    facts = []
    for key, label in (("method", None), ("sites", None), ("metric", "metric"), ("direction", None)):
        if meta.get(key) is not None:
            value = meta[key]
            value = ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
            facts.append(f"{label}: {value}" if label else value)
    if meta.get("normalize"):
        facts.append("normalised by the clean-corrupt gap")
    if meta.get("n_prompts") is not None:
        facts.append(f"{meta['n_prompts']} prompts")
    baseline = meta.get("baseline")
    if isinstance(baseline, Mapping) and {"clean", "corrupt"} <= baseline.keys():
        facts.append(f"metric on clean {_num(baseline['clean'])}, on corrupt {_num(baseline['corrupt'])}")
    shape = " × ".join(f"{d} {n}" for d, n in zip(result.dims, result.values.shape)) or "scalar"
    facts.append(shape)

    if "png" in files:
        picture = f'<img src="{_href(files["png"])}" alt="{_e(name)} heatmap">'
    else:
        picture = (f'<p class="muted">No picture: {_e(result.values.ndim)}-D results are shown as tables only.</p>'
                   if result.values.ndim not in (1, 2) else
                   f'<p class="muted">No picture written; see <a href="{_e(EXPLORER)}">{_e(EXPLORER)}</a>.</p>')
    links = " · ".join(
        f'<a href="{_href(files[kind])}">{_e(files[kind])}</a>' for kind in ("png", "json", "csv") if kind in files
    )
    return _SECTION.format(
        id=_e(re.sub(r"[^A-Za-z0-9_-]+", "-", str(name))),
        name=_e(name),
        facts=_e(" · ".join(facts)),
        picture=picture,
        top=_top_table(result),
        links=links,
    )


def _top_table(result: Result) -> str:
    rows = top_sites(result)
    if not rows:
        return '<p class="muted">No finite values.</p>'
    show_site = any(row["site"] for row in rows)
    dims = list(result.dims)
    head = ["#"] + (["site"] if show_site else []) + dims + ["value"]
    lines = ["<tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>"]
    for rank, row in enumerate(rows, 1):
        cells = [str(rank)] + ([row["site"] or ""] if show_site else []) + [row[d] for d in dims]
        tds = "".join(f"<td>{_e(c)}</td>" for c in cells)
        value = row["value"]
        sign = "pos" if value > 0 else "neg" if value < 0 else ""
        lines.append(f'<tr>{tds}<td class="num {sign}">{_e(_num(value))}</td></tr>')
    caption = f"Top {len(rows)} by |value|"
    return f'<table class="top"><caption>{_e(caption)}</caption>{"".join(lines)}</table>'


def _explorer_context(context: Mapping[str, Any]) -> dict[str, str]:
    return {str(k): _plain(v) for k, v in context.items()}


def _context_table(context: Mapping[str, Any]) -> str:
    if not context:
        return ""
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(_plain(v))}</td></tr>" for k, v in context.items())
    return f'<table class="context">{rows}</table>'


def _plain(value: Any) -> str:
    if isinstance(value, Mapping):
        return ", ".join(f"{k} {_plain(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple, set, frozenset)):
        return ", ".join(_plain(v) for v in value)
    if isinstance(value, float):
        return _num(value)
    return str(value)


def _num(value: Any) -> str:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return str(value)
    if math.isnan(value):
        return "nan"
    return f"{value:.4g}"


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _href(filename: str) -> str:
    return _e(quote(filename))


_SECTION = """<section id="{id}">
<h2>{name}</h2>
<p class="facts">{facts}</p>
<div class="row">
<div class="pic">{picture}</div>
<div class="side">{top}
<p class="links">{links}</p></div>
</div>
</section>"""

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
body {{ font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #222;
       max-width: 1180px; margin: 24px auto; padding: 0 20px; }}
h1 {{ font-size: 22px; margin: 0 0 12px; }}
h2 {{ font-size: 17px; margin: 0 0 2px; font-family: ui-monospace, Menlo, Consolas, monospace; }}
section {{ border-top: 1px solid #ddd; padding: 14px 0 6px; }}
table {{ border-collapse: collapse; font-size: 13px; }}
th, td {{ padding: 3px 10px 3px 0; text-align: left; vertical-align: top; }}
table.context {{ margin-bottom: 14px; }}
table.context th {{ color: #666; font-weight: 600; white-space: nowrap; }}
table.top {{ margin-top: 4px; }}
table.top th {{ border-bottom: 1px solid #ccc; }}
table.top td {{ font-family: ui-monospace, Menlo, Consolas, monospace; border-bottom: 1px solid #f0f0f0;
               white-space: nowrap; }}
caption {{ text-align: left; color: #666; padding-bottom: 4px; }}
td.num {{ text-align: right; }}
td.pos {{ color: #b2182b; }}
td.neg {{ color: #2166ac; }}
.facts, .muted, footer {{ color: #666; margin: 0 0 8px; }}
.row {{ display: flex; flex-wrap: wrap; gap: 20px; align-items: flex-start; }}
.pic {{ flex: 0 1 auto; min-width: 0; max-width: 740px; }}
.pic img {{ max-width: 100%; height: auto; border: 1px solid #eee; }}
.side {{ flex: 1 1 300px; }}
footer {{ border-top: 1px solid #ddd; padding-top: 8px; font-size: 12px; }}
</style>
</head>
<body>
<h1>{title}</h1>
<p class="muted">Interactive view (hover values, click for details): <a href="{explorer}">{explorer}</a></p>
{context}
{sections}
<footer>{footer}</footer>
</body>
</html>
"""
