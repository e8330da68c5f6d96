"""Offline circuitsvis views: the local JavaScript bundle, inlined once per page.

circuitsvis renders a React component into a ``<div>``. Its ``RenderedHTML`` holds two versions:
``cdn_src`` imports the JavaScript from unpkg.com (``str()`` and, when the machine is online,
``_repr_html_`` return it) and ``local_src`` inlines the whole bundle in every view. Its
``_repr_html_`` also probes ``http://google.com`` each time it is displayed, and its markup uses a
self-closing ``<div/>``, which HTML parses as an *open* tag, so two views in one page nest and the
first one's render wipes out the second.

:class:`View` fixes all three. It keeps the component name and its props (JSON, escaped for a
``<script>`` element) and renders:

- :meth:`View.fragment`: markup for a page that already loaded the bundle once
  (:func:`bundle_script`), which is how :func:`codebook_lens.viz.report.build_report` includes
  many views for the price of one bundle;
- :meth:`View.to_html` / :meth:`View.save`: a standalone page with the bundle inlined;
- ``_repr_html_``: the view plus the bundle for Jupyter / Colab / VS Code, never the CDN.

A view may also hold static HTML parts (no JavaScript), and views concatenate with ``+``.
"""

from __future__ import annotations

import functools
import html
import json
import math
import os
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from codebook_lens.atomic import write_file

__all__ = [
    "View",
    "CircuitsVisPart",
    "HtmlPart",
    "circuitsvis_view",
    "html_view",
    "from_circuitsvis",
    "bundle_js",
    "bundle_script",
    "script_json",
    "write_atomic",
]


def write_atomic(path: str | os.PathLike[str], data: str | bytes) -> Path:
    """Write ``data`` (text as UTF-8) to ``path`` atomically and durably
    (:func:`codebook_lens.atomic.write_file`: temporary file, fsync, ``os.replace``, fsync of
    the folder). The parent directory is created if needed. A crash leaves either the old file
    or the new one, never a half-written page. Returns the path."""
    return write_file(path, data)


@functools.lru_cache(maxsize=1)
def bundle_js() -> str:
    """The circuitsvis browser bundle (``dist/cdn/iife.js``), safe to inline in ``<script>``.

    The bundle defines the global ``CircuitsVis`` (``CircuitsVis.render(id, Component, props)``).
    ``</script`` inside it is written ``<\\/script`` (the same JavaScript string, but it cannot
    close the element), and the ``sourceMappingURL`` comment is dropped so that no tool tries to
    fetch the map. Read once per process.
    """
    import circuitsvis

    path = Path(circuitsvis.__file__).parent / "dist" / "cdn" / "iife.js"
    if not path.is_file():
        raise FileNotFoundError(
            f"circuitsvis {getattr(circuitsvis, '__version__', '?')} has no local bundle at "
            f"{path}; reinstall circuitsvis (pip install --force-reinstall 'circuitsvis>=1.43')"
        )
    js = path.read_text(encoding="utf-8")
    js = re.sub(r"(?m)^//# sourceMappingURL=.*$", "", js)
    return re.sub(r"</(script)", r"<\\/\1", js, flags=re.IGNORECASE)


def bundle_script() -> str:
    """A classic ``<script>`` element holding :func:`bundle_js`; put it once before any view."""
    return f"<script>\n{bundle_js()}\n</script>"


_JS_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028"}
_JS_ESCAPES["\u2029"] = "\\u2029"


def _plain(value: Any) -> Any:
    """Tensors and arrays to nested lists; non-finite floats rejected (JSON has none)."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"props hold a non-finite number ({value}); replace NaN/inf first")
    return value


def script_json(props: Mapping[str, Any]) -> str:
    """JSON of ``props`` that is safe inside a ``<script>`` element.

    ``None`` values are dropped (as circuitsvis does), tensors and arrays become lists, and
    ``<``, ``>``, ``&``, U+2028 and U+2029 are written as ``\\uXXXX`` escapes, so a token such as
    ``"</script>"`` cannot end the script.
    """
    text = json.dumps(_plain(props), ensure_ascii=False, allow_nan=False)
    return re.sub("[<>&\u2028\u2029]", lambda m: _JS_ESCAPES[m.group(0)], text)


@dataclass(frozen=True)
class CircuitsVisPart:
    """One circuitsvis React component with its props."""

    component: str
    """The component's name in the bundle, e.g. ``"ColoredTokens"``."""

    props_json: str
    """The props, as :func:`script_json` writes them."""

    def div_and_call(self, element_id: str) -> tuple[str, str]:
        """The container ``<div>`` and the JavaScript statement that renders into it."""
        div = f'<div id="{element_id}" class="cl-cv"></div>'
        call = (
            f'CircuitsVis.render("{element_id}", CircuitsVis.{self.component}, {self.props_json});'
        )
        return div, call


@dataclass(frozen=True)
class HtmlPart:
    """Static HTML (no JavaScript), e.g. a caption or a table of code ids."""

    html: str
    """The markup, already escaped where it holds text."""


_COMPONENT = re.compile(r"^[A-Z][A-Za-z0-9]*$")


@dataclass(frozen=True)
class View:
    """A visual made of circuitsvis components and static HTML that renders without network.

    Build one with :func:`circuitsvis_view`, :func:`html_view`, :func:`from_circuitsvis` or the
    functions of :mod:`codebook_lens.viz.codes`; join views with ``+``.
    """

    parts: tuple[CircuitsVisPart | HtmlPart, ...]
    """The pieces, in display order."""

    @property
    def needs_bundle(self) -> bool:
        """Whether any part is a circuitsvis component (and so needs :func:`bundle_script`)."""
        return any(isinstance(p, CircuitsVisPart) for p in self.parts)

    def __add__(self, other: View) -> View:
        if not isinstance(other, View):
            return NotImplemented
        return View(self.parts + other.parts)

    def _markup(self, id_prefix: str | None) -> tuple[str, list[str]]:
        prefix = id_prefix or f"cv-{uuid.uuid4().hex[:12]}"
        body, calls = [], []
        for i, part in enumerate(self.parts):
            if isinstance(part, HtmlPart):
                body.append(part.html)
            else:
                div, call = part.div_and_call(f"{prefix}-{i}")
                body.append(div)
                calls.append(call)
        return "\n".join(body), calls

    def fragment(self, id_prefix: str | None = None) -> str:
        """Markup for a page that loads :func:`bundle_script` once, earlier in the document.

        Element ids start with ``id_prefix`` (a fresh random one by default), so a page may hold
        the same view twice.
        """
        body, calls = self._markup(id_prefix)
        if not calls:
            return f'<div class="cl-view">{body}</div>'
        script = "<script>\n" + "\n".join(calls) + "\n</script>"
        return f'<div class="cl-view">{body}\n{script}</div>'

    def notebook_html(self) -> str:
        """Self-contained markup for one notebook output: the view and, if needed, the bundle.

        One module script holds the bundle and every render call (as circuitsvis's own
        ``local_src`` does, so it runs wherever circuitsvis runs: Jupyter, Colab, VS Code).
        """
        body, calls = self._markup(None)
        if not calls:
            return f'<div class="cl-view">{body}</div>'
        js = bundle_js() + "\n" + "\n".join(calls)
        script = f'<script crossorigin type="module">\n{js}\n</script>'
        return f'<div class="cl-view">{body}\n{script}</div>'

    def _repr_html_(self) -> str:
        """Jupyter / Colab display: always the inlined bundle, never the CDN or a network probe."""
        return self.notebook_html()

    def to_html(self, title: str = "codebook_lens view") -> str:
        """A standalone page (bundle inlined once) that opens offline in any browser."""
        head_js = bundle_script() if self.needs_bundle else ""
        return (
            '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{html.escape(title)}</title>{head_js}</head>\n<body>\n"
            f"{self.fragment()}\n</body></html>\n"
        )

    def save(self, path: str | os.PathLike[str], title: str = "codebook_lens view") -> Path:
        """Write :meth:`to_html` to ``path`` atomically; returns the path."""
        return write_atomic(path, self.to_html(title))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description (component names, props, static HTML); see
        :meth:`from_dict`. Lets a pipeline store views and rebuild a report later."""
        parts: list[dict[str, str]] = []
        for p in self.parts:
            if isinstance(p, HtmlPart):
                parts.append({"html": p.html})
            else:
                parts.append({"component": p.component, "props": p.props_json})
        return {"format": "codebook_lens.view/1", "parts": parts}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> View:
        """Rebuild a view from :meth:`to_dict` output (props are re-validated and re-escaped)."""
        if d.get("format") != "codebook_lens.view/1" or not isinstance(d.get("parts"), list):
            raise ValueError("not a codebook_lens view (expected format 'codebook_lens.view/1')")
        parts: list[CircuitsVisPart | HtmlPart] = []
        for p in d["parts"]:
            if "html" in p:
                parts.append(HtmlPart(str(p["html"])))
            else:
                parts += circuitsvis_view(p["component"], **json.loads(p["props"])).parts
        return cls(tuple(parts))


def circuitsvis_view(component: str, **props: Any) -> View:
    """A view of one circuitsvis component, e.g. ``circuitsvis_view("ColoredTokens", tokens=..,
    values=..)``. Props use circuitsvis's JavaScript names (camelCase); ``None`` props are
    dropped."""
    if not _COMPONENT.match(component):
        raise ValueError(f"component must be a circuitsvis component name, got {component!r}")
    return View((CircuitsVisPart(component, script_json(props)),))


def html_view(markup: str) -> View:
    """A view of static HTML. The caller escapes any text in ``markup`` (:func:`html.escape`)."""
    return View((HtmlPart(markup),))


_CDN_CALL = re.compile(
    r"import\s*\{\s*render\s*,\s*(?P<name>\w+)\s*\}\s*from\s*\"[^\"]*\";\s*"
    r"render\(\s*\"[^\"]*\",\s*(?P=name),\s*(?P<props>.*)\)\s*</script>\s*$",
    re.DOTALL,
)


def from_circuitsvis(rendered: Any) -> View:
    """Convert any circuitsvis ``RenderedHTML`` (e.g. from ``circuitsvis.attention.
    attention_heads``) into an offline :class:`View`.

    The component and props are read back from the object's ``cdn_src``; props are re-escaped.
    """
    src = getattr(rendered, "cdn_src", None)
    m = _CDN_CALL.search(src) if isinstance(src, str) else None
    if m is None:
        raise ValueError(
            "from_circuitsvis expects a circuitsvis RenderedHTML (the return value of a "
            f"circuitsvis function); got {type(rendered).__name__}"
        )
    props = json.loads(m.group("props"))
    return circuitsvis_view(m.group("name"), **props)
