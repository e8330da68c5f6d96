"""The HTML of the feature dashboards: one page from a site's data (its CSS, JavaScript and
data inlined, under a Content-Security-Policy that refuses every network load), and the index
linking the pages. The page's template, style and script are package files
(``codebook_lens/export/static/dashboard.{html,css,js}``)."""

from __future__ import annotations

import html
import json
import re
from collections.abc import Sequence
from importlib import resources
from typing import Any

from codebook_lens.viz.report import CSP

__all__ = ["DATA_ID", "dashboard_html", "embed_json", "index_html"]

DATA_ID = "cl-data"
"""The id of the ``<script type="application/json">`` element holding a page's data."""

_SLOT = re.compile(r"\{\{([A-Z]+)\}\}")


def _static(name: str) -> str:
    return (resources.files("codebook_lens.export") / "static" / name).read_text("utf-8")


def embed_json(data: Any) -> str:
    """``data`` as JSON that is safe inside a ``<script>`` element: ``<``, ``>`` and ``&`` are
    escaped (``\\u003c``...), so no token text can close the element or open a comment."""
    text = json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    for ch, esc in (("&", "\\u0026"), ("<", "\\u003c"), (">", "\\u003e")):
        text = text.replace(ch, esc)
    return text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def _fill(template: str, parts: dict[str, str]) -> str:
    """The template with each ``{{NAME}}`` replaced in one pass (inserted text is not read
    again, so data that looks like a slot stays as it is)."""
    return _SLOT.sub(lambda m: parts[m.group(1)], template)


def dashboard_html(data: dict[str, Any]) -> str:
    """One site's dashboard page from :func:`~codebook_lens.export.dashboard.dashboard_data`."""
    title = f"{data['model']} · {data['site']} · codebook features"
    return _fill(
        _static("dashboard.html"),
        {
            "CSP": html.escape(CSP),
            "TITLE": html.escape(title),
            "CSS": _static("dashboard.css"),
            "JS": _static("dashboard.js"),
            "DATAID": DATA_ID,
            "DATA": embed_json(data),
        },
    )


def index_html(model: str, pages: Sequence[tuple[str, str, int]]) -> str:
    """A page linking each ``(site, file, n_features)`` page (relative links)."""
    rows = "".join(
        f'<li><a href="{html.escape(f)}">{html.escape(s)}</a> · {n} codes</li>' for s, f, n in pages
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{html.escape(CSP)}">'
        f"<title>{html.escape(model)} · codebook features</title>"
        "<style>body{font-family:system-ui,sans-serif;margin:2em auto;max-width:50em}</style>"
        f"</head><body><h1>{html.escape(model)}: codebook feature dashboards</h1>"
        f"<ul>{rows}</ul></body></html>\n"
    )
