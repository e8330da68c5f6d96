"""One self-contained HTML report: summary tables, figures (inline images) and interactive views.

The page holds everything it shows: figures are ``data:`` URIs, the circuitsvis bundle is
inlined once, and a Content-Security-Policy forbids any network load, so it opens from a file,
an e-mail attachment or an offline machine exactly as it was written.
:func:`~codebook_lens.viz.ref_scanner.external_refs` lists anything in a page that would reach
outside it; :func:`report_html` refuses to produce such a page. The summary tables come from
:func:`~codebook_lens.viz.tables.summary_tables`.

Two layers:

- :func:`build_report` / :func:`report_html`: objects in, one HTML file out (atomic write);
- :func:`save_report` / :func:`rebuild_report`: also keep the inputs in a directory
  (``report.json``, ``figures/*.png|svg``, ``views/*.json``), so ``codebook-lens report DIR``
  can rebuild ``DIR/report.html`` without rerunning anything.
"""

from __future__ import annotations

import base64
import html
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from matplotlib.figure import Figure

from codebook_lens.viz.figures import figure_to_data_uri
from codebook_lens.viz.offline import View, bundle_script, from_circuitsvis, write_atomic
from codebook_lens.viz.ref_scanner import external_refs
from codebook_lens.viz.tables import summary_tables

__all__ = [
    "build_report",
    "report_html",
    "save_report",
    "rebuild_report",
    "external_refs",
    "summary_tables",
    "CSP",
    "MANIFEST",
]

CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "img-src data:; font-src data:; connect-src 'none'; base-uri 'none'; form-action 'none'"
)
"""The page's Content-Security-Policy: inline scripts, styles and ``data:`` images only; the
browser refuses every network request (and logs the refusal)."""

MANIFEST = "report.json"
"""File name of the manifest :func:`save_report` writes and :func:`rebuild_report` reads."""

FigureLike = Figure | str | os.PathLike
ViewLike = Any  # View | str (trusted static HTML) | circuitsvis RenderedHTML

# ----------------------------------------------------------------------------- the page

_STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;
 margin:0;color:#1d1d1f;background:#fff;line-height:1.45}
main{max-width:1200px;margin:0 auto;padding:24px 32px 64px}
h1{font-size:1.7em;margin:.2em 0 .1em}h2{border-bottom:1px solid #ddd;padding-bottom:4px;
 margin-top:2em}h3{margin:1.4em 0 .4em;font-size:1.05em}
nav{font-size:.92em;color:#555}nav a{margin-right:1em;color:#1f5fa8;text-decoration:none}
.cl-notes{white-space:pre-wrap;background:#f6f8fa;border-left:3px solid #1f77b4;
 padding:8px 12px;margin:12px 0}
.cl-table{border-collapse:collapse;font-size:.9em;margin:6px 0 12px}
.cl-table th,.cl-table td{border:1px solid #ddd;padding:3px 10px;text-align:right}
.cl-table thead th{background:#f0f3f6;text-align:center}.cl-table tbody th{text-align:left;
 font-weight:600;background:#fafbfc}
figure{margin:10px 0 24px}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:.9em;color:#555}
.cl-view{margin:6px 0 24px}.cl-caption{font-size:.9em;color:#444;margin:4px 0}
.cl-grid-wrap{overflow-x:auto;max-width:100%}
.cl-grid{border-collapse:collapse;font:12px ui-monospace,Menlo,Consolas,monospace}
.cl-grid th,.cl-grid td{border:1px solid #fff;padding:1px 4px;text-align:center;min-width:18px}
.cl-grid th code{white-space:pre;background:#f2f2f2;padding:0 2px}
footer{margin-top:3em;font-size:.8em;color:#777}
"""


def _slug(name: str, used: set[str], prefix: str = "") -> str:
    """A unique ``[a-z0-9-]`` name for ``name`` (for ids and file names), recorded in ``used``."""
    base = prefix + (re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "x")
    a, i = base, 1
    while a in used:
        i += 1
        a = f"{base}-{i}"
    used.add(a)
    return a


def _as_data_uri(name: str, fig: Any, fmt: str) -> str:
    if isinstance(fig, Figure):
        return figure_to_data_uri(fig, fmt=fmt)  # type: ignore[arg-type]
    if isinstance(fig, str) and fig.startswith("data:image/"):
        return fig
    if isinstance(fig, (os.PathLike, str)):
        path = Path(fig)
        mime = {".png": "image/png", ".svg": "image/svg+xml", ".jpg": "image/jpeg"}.get(
            path.suffix.lower()
        )
        if mime is None or not path.is_file():
            raise ValueError(
                f"figure {name!r}: {str(fig)[:80]!r} is not a data:image URI or an existing "
                ".png/.svg/.jpg file"
            )
        return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"
    raise TypeError(
        f"figure {name!r} must be a matplotlib Figure, a data:image URI or an image path; got "
        f"{type(fig).__name__}"
    )


def _as_view(name: str, v: Any) -> View:
    if isinstance(v, View):
        return v
    if isinstance(v, str):
        return View.from_dict({"format": "codebook_lens.view/1", "parts": [{"html": v}]})
    if hasattr(v, "cdn_src"):
        return from_circuitsvis(v)
    raise TypeError(
        f"view {name!r} must be a codebook_lens View, an HTML string or a circuitsvis "
        f"RenderedHTML; got {type(v).__name__}"
    )


def _section(anchor: str, heading: str, parts: list[str]) -> tuple[str, list[str]]:
    """A page section: its ``<nav>`` link and its HTML (an ``<h2>`` then ``parts``)."""
    return f'<a href="#{anchor}">{heading}</a>', [f'<h2 id="{anchor}">{heading}</h2>', *parts]


def _figure_parts(
    figures: Mapping[str, FigureLike], figure_format: str, used: set[str]
) -> list[str]:
    parts = []
    for name, fig in figures.items():
        uri = _as_data_uri(name, fig, figure_format)
        a = _slug(name, used, "fig-")
        parts.append(
            f'<figure id="{a}"><img src="{html.escape(uri)}" alt="{html.escape(name)}">'
            f"<figcaption>{html.escape(name)}</figcaption></figure>"
        )
    return parts


def _view_parts(views: Mapping[str, View], used: set[str]) -> list[str]:
    """Each view's fragment under its heading; raises if any would load from outside the page."""
    parts: list[str] = []
    refs: list[str] = []
    for i, (name, view) in enumerate(views.items()):
        a = _slug(name, used, "view-")
        frag = view.fragment(id_prefix=f"cv{i}")
        refs += [f"view {name!r}: {r}" for r in external_refs(frag)]
        parts.append(f'<h3 id="{a}">{html.escape(name)}</h3>{frag}')
    if refs:
        raise ValueError(
            "the report would load from outside the page (it must work offline): " + "; ".join(refs)
        )
    return parts


def _page(title: str, body: list[str], need_bundle: bool) -> str:
    head = (
        '<meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style>"
        + (bundle_script() if need_bundle else "")
    )
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head>{head}</head>\n<body><main>\n'
        + "\n".join(body)
        + "\n</main></body></html>\n"
    )


def report_html(
    title: str,
    summary: Mapping[str, Any] | None = None,
    figures: Mapping[str, FigureLike] | None = None,
    views: Mapping[str, ViewLike] | None = None,
    notes: str = "",
    figure_format: Literal["png", "svg"] = "png",
    footer: str | None = None,
) -> str:
    """The report page as a string; see :func:`build_report`.

    Raises ``ValueError`` if the page would load anything from outside itself (a view's HTML
    with a ``src``/``href`` to a URL, a CDN import, ...), listing what and where.
    """
    figures = dict(figures or {})
    views = {k: _as_view(k, v) for k, v in (views or {}).items()}
    tables = summary_tables(summary) if summary else []
    used: set[str] = set()
    sections: list[tuple[str, list[str]]] = []
    if tables:
        parts = [f"<h3>{html.escape(heading)}</h3>{table}" for heading, table in tables]
        sections.append(_section("summary", "Summary", parts))
    if figures:
        sections.append(_section("figures", "Figures", _figure_parts(figures, figure_format, used)))
    if views:
        sections.append(_section("views", "Interactive views", _view_parts(views, used)))
    body: list[str] = [f"<h1>{html.escape(title)}</h1>"]
    if notes:
        body.append(f'<div class="cl-notes">{html.escape(notes.strip())}</div>')
    if sections:
        body.append("<nav>" + "".join(link for link, _ in sections) + "</nav>")
    body += [part for _, parts in sections for part in parts]
    if footer is None:
        from codebook_lens import __version__

        footer = f"Written by codebook_lens {__version__}. Self-contained: works offline."
    body.append(f"<footer>{html.escape(footer)}</footer>")
    return _page(title, body, any(v.needs_bundle for v in views.values()))


def build_report(
    out_path: str | os.PathLike[str],
    title: str,
    summary: Mapping[str, Any] | None = None,
    figures: Mapping[str, FigureLike] | None = None,
    views: Mapping[str, ViewLike] | None = None,
    notes: str = "",
    figure_format: Literal["png", "svg"] = "png",
    footer: str | None = None,
) -> Path:
    """Write ONE self-contained HTML report to ``out_path`` (atomically) and return the path.

    - ``summary``: nested metrics (numbers, strings, tensors), shown as tables
      (:func:`summary_tables`);
    - ``figures``: name -> matplotlib ``Figure`` (embedded as ``figure_format``), a
      ``data:image/..`` URI, or the path of a .png/.svg/.jpg file (embedded);
    - ``views``: name -> :class:`~codebook_lens.viz.offline.View`, a circuitsvis
      ``RenderedHTML`` (converted to offline form) or a static HTML string (trusted: not escaped,
      but checked for external references);
    - ``notes``: plain text shown under the title (escaped; line breaks kept).

    The circuitsvis bundle is included once, however many views there are. Titles, names and
    notes are escaped. The page loads nothing from the network (see :func:`external_refs`).
    """
    page = report_html(title, summary, figures, views, notes, figure_format, footer)
    return write_atomic(out_path, page)


# ----------------------------------------------------------------------------- report dirs


def _save_figures(
    out: Path, figures: Mapping[str, FigureLike], figure_format: str
) -> list[dict[str, str]]:
    """Write each figure to ``out/figures/<slug>.<ext>``; returns the manifest entries."""
    used: set[str] = set()
    entries = []
    for name, fig in figures.items():
        uri = _as_data_uri(name, fig, figure_format)
        mime, b64 = uri[5:].split(";base64,", 1)
        ext = {"image/png": ".png", "image/svg+xml": ".svg", "image/jpeg": ".jpg"}.get(mime)
        if ext is None:
            raise ValueError(f"figure {name!r}: unsupported image type {mime}")
        rel = f"figures/{_slug(name, used)}{ext}"
        write_atomic(out / rel, base64.b64decode(b64))
        entries.append({"name": name, "file": rel})
    return entries


def _save_views(out: Path, views: Mapping[str, ViewLike]) -> list[dict[str, str]]:
    """Write each view to ``out/views/<slug>.json``; returns the manifest entries."""
    used: set[str] = set()
    entries = []
    for name, v in views.items():
        rel = f"views/{_slug(name, used)}.json"
        write_atomic(out / rel, json.dumps(_as_view(name, v).to_dict()))
        entries.append({"name": name, "file": rel})
    return entries


def save_report(
    out_dir: str | os.PathLike[str],
    title: str,
    summary: Mapping[str, Any] | None = None,
    figures: Mapping[str, FigureLike] | None = None,
    views: Mapping[str, ViewLike] | None = None,
    notes: str = "",
    figure_format: Literal["png", "svg"] = "png",
) -> Path:
    """Keep a report's inputs in ``out_dir`` and build ``out_dir/report.html`` from them.

    Writes ``figures/<name>.png|svg``, ``views/<name>.json`` (:meth:`View.to_dict`) and
    ``report.json`` (title, notes, summary, and the names and files of figures and views, in
    order); :func:`rebuild_report` turns them back into ``report.html``. ``summary`` must be
    JSON-serialisable (tensors and numpy values are converted). Returns the HTML path.
    """
    out = Path(out_dir)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    (out / "views").mkdir(parents=True, exist_ok=True)
    fig_entries = _save_figures(out, figures or {}, figure_format)
    view_entries = _save_views(out, views or {})
    manifest = {
        "format": "codebook_lens.report/1",
        "title": title,
        "notes": notes,
        "summary": _jsonable(dict(summary or {})),
        "figures": fig_entries,
        "views": view_entries,
    }
    write_atomic(out / MANIFEST, json.dumps(manifest, indent=2, allow_nan=True))
    return rebuild_report(out)


def rebuild_report(
    report_dir: str | os.PathLike[str], out_path: str | os.PathLike[str] | None = None
) -> Path:
    """Rebuild ``report.html`` (or ``out_path``) from a directory written by
    :func:`save_report`; returns the HTML path. Missing files raise with their names."""
    d = Path(report_dir)
    mpath = d / MANIFEST
    if not mpath.is_file():
        raise FileNotFoundError(
            f"{mpath} not found: {d} is not a report directory (save_report writes {MANIFEST})"
        )
    m = json.loads(mpath.read_text(encoding="utf-8"))
    if m.get("format") != "codebook_lens.report/1":
        raise ValueError(f"{mpath}: unknown format {m.get('format')!r}")
    missing = [e["file"] for e in m["figures"] + m["views"] if not (d / e["file"]).is_file()]
    if missing:
        raise FileNotFoundError(f"report directory {d} lacks {missing}")
    figures = {e["name"]: d / e["file"] for e in m["figures"]}
    views = {
        e["name"]: View.from_dict(json.loads((d / e["file"]).read_text(encoding="utf-8")))
        for e in m["views"]
    }
    return build_report(
        out_path or d / "report.html", m["title"], m["summary"], figures, views, m["notes"]
    )


def _jsonable(v: Any) -> Any:
    if hasattr(v, "tolist") and not isinstance(v, str):
        return v.tolist()
    if isinstance(v, Mapping):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return str(v)
