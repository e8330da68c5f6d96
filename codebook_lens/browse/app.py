"""The browser's FastAPI app: a JSON API under ``/api`` and one static page.

Routes (all GET unless noted)::

    /                        the page (static/index.html); /static/app.js, /static/style.css
    /api/overview            sites, codebooks, usage histograms, dead fractions, metrics
    /api/search              kind=regex|token|label, q, by, order, thresholds, site, paging
    /api/code/{site}/{head}/{code}   code page: examples, frequency, tokens, labels
    /api/code/{site}/{head}/{code}/effects   logit effect (top/bottom) and nearest codes
    /api/context/{seq}       token view: codes at every site and head per position
    /api/tokens              the vocabulary's texts
    /api/lab  (POST)         prompt + interventions -> unpatched and patched runs
    /api/bookmarks (GET, POST), /api/bookmarks/{id} (DELETE)

Every client error is a 4xx ``{"error": message}``; nothing outside the package's static files
and DIR is read. With ``access`` (as :func:`~codebook_lens.browse.server.serve` always passes),
requests for another ``Host``, writes from another ``Origin`` and, beyond loopback, requests
without the token are refused first (:mod:`codebook_lens.browse.access`).
"""

from __future__ import annotations

import math
from importlib import resources
from typing import Any

import torch
from fastapi import FastAPI, Query
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from codebook_lens.browse.access import Access, AccessGuard
from codebook_lens.browse.bookmarks import Bookmarks
from codebook_lens.browse.codes import check_code, code_stats, context_view, nearest_codes
from codebook_lens.browse.errors import BrowseError, bad_request
from codebook_lens.browse.lab import MAX_NEW_TOKENS, Intervention, ModelRunner
from codebook_lens.browse.layout import BrowseData
from codebook_lens.browse.search import SearchIndex
from codebook_lens.browse.text import MAX_PATTERN_LEN, StoreText

__all__ = ["create_app", "BrowseState"]

_STATIC = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
_CSP = "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'"


class BrowseState:
    """The loaded DIR with its precomputed indexes (built once at start-up)."""

    def __init__(self, data: BrowseData, regex_budget_s: float = 2.0):
        self.data = data
        self.store = data.store
        n_labels = len(data.label_names)
        self.index = SearchIndex(data.store, data.labels, n_labels)
        self.text = StoreText(data.store.require_tokens(), data.vocab)
        self.runner = ModelRunner(data.model_path, data.kind, data.tokenizer_path, data.prompts)
        self.runner.heads = {
            s: (data.store.n_heads(s) if data.store.per_head[s] else None) for s in self.store.sites
        }
        self.bookmarks = Bookmarks(data.bookmarks_path)
        self.regex_budget_s = regex_budget_s


class LabIntervention(BaseModel):
    site: str = Field(max_length=200)
    action: str = Field(pattern="^(force|ablate)$")
    code: int | None = None
    head: int | None = None
    positions: list[int] | None = Field(default=None, max_length=4096)


class LabRequest(BaseModel):
    prompt: str = Field(max_length=20000)
    interventions: list[LabIntervention] = Field(default_factory=list, max_length=64)
    n_new: int = Field(default=16, ge=0, le=MAX_NEW_TOKENS)
    seed: int = 0
    top: int = Field(default=10, ge=1, le=100)


class BookmarkRequest(BaseModel):
    site: str = Field(max_length=200)
    head: int = 0
    code: int
    note: str = ""


def _histogram(counts: torch.Tensor) -> dict[str, Any]:
    """Codes per usage bin: 0, then [10^i, 10^(i+1)) firings."""
    c = counts.flatten().double()
    top = max(1, math.ceil(math.log10(float(c.max()) + 1))) if c.numel() else 1
    edges = [0] + [10**i for i in range(top + 1)]
    bins = torch.bucketize(c, torch.tensor(edges[1:], dtype=torch.double), right=True)
    hist = torch.bincount(bins, minlength=len(edges)).tolist()
    labels = ["0"] + [f"{edges[i]}-{edges[i + 1] - 1}" for i in range(1, len(edges) - 1)]
    return {"bins": labels, "counts": hist[: len(labels)]}


def _numbers(d: Any, prefix: str = "", depth: int = 0) -> dict[str, float]:
    """Numeric leaves of a metrics dict (lists skipped), as dotted keys."""
    out: dict[str, float] = {}
    if depth > 3 or not isinstance(d, dict):
        return out
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, bool):
            continue
        if isinstance(v, (int, float)):
            out[key] = v
        elif isinstance(v, dict) and k != "config":
            out.update(_numbers(v, key + ".", depth + 1))
    return out


def overview(st: BrowseState) -> dict[str, Any]:
    """The Overview view."""
    store = st.store
    sites = []
    for s in store.sites:
        counts = st.index.counts[s]
        sites.append(
            {
                "site": s,
                "n_codes": store.n_codes[s],
                "k": store.k(s),
                "n_heads": store.n_heads(s),
                "per_head": store.per_head[s],
                "dead_fraction": float((counts == 0).double().mean()),
                "used": int((counts > 0).sum()),
                "histogram": _histogram(counts),
            }
        )
    return {
        "dir": st.data.root.name,
        "kind": st.data.kind,
        "n_seq": store.n_seq,
        "seq_len": store.seq_len,
        "n_tokens": store.n_tokens,
        "labels": st.data.label_names,
        "sites": sites,
        "model": st.runner.info(),
        "metrics": _numbers(st.data.metrics),
    }


def create_app(
    data: BrowseData, regex_budget_s: float = 2.0, access: Access | None = None
) -> FastAPI:
    """The app serving ``data`` (see the module docstring for the routes). ``access``
    (:func:`~codebook_lens.browse.access.access_for`) guards it; without it every request is
    answered, which suits an in-process client but not a server."""
    st = BrowseState(data, regex_budget_s)
    app = FastAPI(title="codebook-lens browse", docs_url=None, redoc_url=None, openapi_url=None)
    if access is not None:
        app.add_middleware(AccessGuard, access=access)
    app.state.browse = st
    _errors(app)
    _static_routes(app)
    _query_routes(app, st)
    _action_routes(app, st)
    return app


def _errors(app: FastAPI) -> None:
    @app.exception_handler(BrowseError)
    async def browse_error(request: Any, exc: BrowseError) -> JSONResponse:
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Any, exc: StarletteHTTPException) -> JSONResponse:
        msg = (
            "no such page or API route; the API lives under /api"
            if exc.status_code == 404
            else None
        )
        return JSONResponse({"error": msg or str(exc.detail)}, status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Any, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for e in exc.errors():
            where = ".".join(str(x) for x in e.get("loc", ()) if x not in ("query", "path", "body"))
            parts.append(f"{where or 'request'}: {e.get('msg')}")
        return JSONResponse({"error": "; ".join(parts)}, status_code=422)


def _static_routes(app: FastAPI) -> None:
    root = resources.files("codebook_lens.browse") / "static"

    def serve(name: str) -> Response:
        body = (root / name).read_bytes()
        headers = {"Content-Security-Policy": _CSP, "Cache-Control": "no-cache"}
        return Response(body, media_type=_STATIC[name], headers=headers)

    @app.get("/", include_in_schema=False)
    def index() -> Response:
        return serve("index.html")

    @app.get("/static/{name}", include_in_schema=False)
    def static(name: str) -> Response:
        if name not in _STATIC:  # a fixed list: no path is ever built from the request
            raise BrowseError(404, f"no static file {name!r}")
        return serve(name)


def _query_routes(app: FastAPI, st: BrowseState) -> None:
    @app.get("/api/overview")
    def get_overview() -> dict[str, Any]:
        return overview(st)

    @app.get("/api/tokens")
    def get_tokens() -> dict[str, Any]:
        return {"vocab": st.data.vocab, "labels": st.data.label_names, "kind": st.data.kind}

    @app.get("/api/search")
    def search(
        kind: str = Query("regex", pattern="^(regex|token|label)$"),
        q: str = Query(..., min_length=1, max_length=MAX_PATTERN_LEN),
        by: str = "f1",
        order: str = Query("desc", pattern="^(asc|desc)$"),
        mode: str = "overlap",
        min_precision: float = Query(0.0, ge=0, le=1),
        min_recall: float = Query(0.0, ge=0, le=1),
        min_count: int = Query(1, ge=0),
        site: str | None = None,
        offset: int = Query(0, ge=0),
        limit: int = Query(50, ge=1, le=500),
    ) -> dict[str, Any]:
        if kind == "regex":
            ranking = st.index.feature_ranking(st.text.regex_feature(q, mode, st.regex_budget_s))
        elif kind == "token":
            ids = st.text.token_ids(q)
            ranking = st.index.feature_ranking(
                torch.isin(st.store.require_tokens(), torch.tensor(ids))
            )
        else:
            ranking = st.index.label_ranking(_label_id(st, q))
        out = st.index.rank(
            ranking, by, order == "desc", min_precision, min_recall, min_count, site, offset, limit
        )
        return {"kind": kind, "q": q, "by": by, **out}

    @app.get("/api/code/{site}/{head}/{code}")
    def code_page(site: str, head: int, code: int, seed: int = 0, n: int = Query(20, ge=1, le=200)):
        return code_stats(
            st.store, st.index, site, head, code, st.data.vocab, st.data.label_names, n, seed=seed
        )

    @app.get("/api/code/{site}/{head}/{code}/effects")
    def code_effects(site: str, head: int, code: int) -> dict[str, Any]:
        check_code(st.store, site, head, code)
        book = st.runner.codebook(site)
        if book is None:
            why = st.runner.error or f"the model has no codebook at {site}"
            return {"logits": {"available": False, "reason": why}, "nearest": []}
        return {
            "logits": st.runner.logit_effect(site, head, code),
            "nearest": nearest_codes(book, st.index, site, head, code),
        }

    @app.get("/api/context/{seq}")
    def context(seq: int) -> dict[str, Any]:
        return context_view(st.store, seq, st.data.vocab, st.data.labels, st.data.label_names)


def _label_id(st: BrowseState, q: str) -> int:
    names = st.data.label_names
    if q in names:
        return names.index(q)
    if q.lstrip("-").isdigit():
        return int(q)
    raise bad_request(f"no label {q!r}; labels are {names[:20]}{' ...' if len(names) > 20 else ''}")


def _action_routes(app: FastAPI, st: BrowseState) -> None:
    @app.post("/api/lab")
    def lab(req: LabRequest) -> dict[str, Any]:
        ids = st.runner.tokenize(req.prompt)
        ivs = [Intervention(**iv.model_dump()) for iv in req.interventions]
        out = st.runner.run(ids, ivs, req.n_new, req.seed, req.top)
        out["texts"] = [st.data.vocab[i] if i < len(st.data.vocab) else str(i) for i in ids]
        return out

    @app.get("/api/bookmarks")
    def list_bookmarks() -> dict[str, Any]:
        return {"bookmarks": st.bookmarks.list()}

    @app.post("/api/bookmarks")
    def add_bookmark(req: BookmarkRequest) -> dict[str, Any]:
        check_code(st.store, req.site, req.head, req.code)
        return st.bookmarks.add(req.site, req.head, req.code, req.note)

    @app.delete("/api/bookmarks/{bookmark_id}")
    def delete_bookmark(bookmark_id: int) -> dict[str, Any]:
        st.bookmarks.delete(bookmark_id)
        return {"deleted": bookmark_id}
