"""Interactive HTML for results: self-contained pages (no network, no CDN) with hover values, token
labels, per-prompt breakdowns, attention patterns per head, edge graphs with a pruning slider and
faithfulness tables.

``views`` turns a :class:`~crosspatch.results.result.Result` into a JSON view (what to draw and the
numbers); ``graph`` turns an edge Result into the generic graph JSON (``{nodes, links}``, close to
Neuronpedia's attribution-graph schema); ``page`` inlines the shipped script and style sheet
(``assets/``, package data) with the views into one HTML document. Imports only the results and the
site vocabulary.
"""

from .graph import graph_json
from .page import page_html, repr_html
from .views import view

__all__ = ["graph_json", "page_html", "repr_html", "view"]
