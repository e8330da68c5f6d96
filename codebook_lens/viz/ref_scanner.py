"""Find everything in an HTML page that would load from outside it.

:func:`external_refs` parses a page (attributes, inline CSS, inline scripts) and lists every
reference that is not local to the page itself: the report builder
(:mod:`codebook_lens.viz.report`) refuses a page for which the list is not empty.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser

__all__ = ["external_refs"]

_URL_ATTRS = {
    "src", "href", "srcset", "action", "formaction", "poster", "data", "background", "cite",
    "longdesc", "manifest", "codebase", "ping", "xlink:href", "archive", "profile", "icon",
}  # fmt: skip
_CSS_URL = re.compile(r"url\(\s*(['\"]?)(?P<u>[^'\")]*)\1\s*\)|@import\s+(['\"])(?P<i>[^'\"]*)\3")
_JS_IMPORT = re.compile(
    r"""(?:\bfrom|\bimport\s*\(?|\bimportScripts\s*\()\s*(['"`])(?P<u>(?:[a-z][a-z0-9+.-]*:)?//[^'"`]*)\1""",
    re.IGNORECASE,
)


def _is_local(url: str) -> bool:
    u = url.strip()
    return u == "" or u.startswith("#") or u.lower().startswith("data:")


def _srcset_urls(value: str) -> list[str]:
    """The URLs of a ``srcset`` (HTML spec: a URL is a run of non-space characters, possibly
    with commas inside, as in ``data:`` URIs; descriptors follow it up to the next comma)."""
    urls, i, n = [], 0, len(value)
    while i < n:
        while i < n and (value[i].isspace() or value[i] == ","):
            i += 1
        j = i
        while j < n and not value[j].isspace():
            j += 1
        url = value[i:j]
        if url.endswith(","):
            url = url.rstrip(",")
        else:
            while j < n and value[j] != ",":
                j += 1
        if url:
            urls.append(url)
        i = j + 1
    return urls


class _RefFinder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.refs: list[str] = []
        self._in: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if value is None:
                continue
            if name in _URL_ATTRS:
                urls = [value]
                if name == "srcset":
                    urls = _srcset_urls(value)
                self.refs += [f"<{tag} {name}={u!r}>" for u in urls if not _is_local(u)]
            elif name == "style":
                self._css(value, f"<{tag} style>")
            elif name == "http-equiv" and value.lower() == "refresh":
                self.refs.append(f"<{tag} http-equiv=refresh>")
        self._in = tag if tag in ("script", "style") else None

    def handle_endtag(self, tag: str) -> None:
        self._in = None

    def _css(self, text: str, where: str) -> None:
        for m in _CSS_URL.finditer(text):
            u = m.group("u") if m.group("u") is not None else m.group("i")
            if not _is_local(u or ""):
                self.refs.append(f"{where} url({u!r})")

    def handle_data(self, data: str) -> None:
        if self._in == "style":
            self._css(data, "<style>")
        elif self._in == "script":
            self.refs += [f"<script> import {m.group('u')!r}" for m in _JS_IMPORT.finditer(data)]


def external_refs(page: str) -> list[str]:
    """Everything in an HTML page that would load from outside it: URL attributes (``src``,
    ``href``, ...) that are not ``#anchors`` or ``data:`` URIs, CSS ``url()``/``@import``, and
    JavaScript module imports from a URL (circuitsvis's CDN form). Text and JavaScript strings
    that merely mention a URL are inert and not listed. Returns a description of each."""
    finder = _RefFinder()
    finder.feed(page)
    finder.close()
    return finder.refs
