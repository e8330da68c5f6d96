"""The code browser: a local web server (JSON API + one static page) over a code store.

``codebook-lens browse DIR`` serves the output of ``codebook-lens demo`` / ``lm-demo`` (which
call :func:`write_browse_data`, describing themselves in DIR: the browser imports no
experiment). The web framework (FastAPI + uvicorn, the ``browse`` extra) is
imported only by :func:`create_app` and :func:`serve`, so the demos need none of it.
"""

from __future__ import annotations

from typing import Any

from codebook_lens.browse.layout import BrowseData, load_browse_data, write_browse_data

__all__ = [
    "write_browse_data",
    "load_browse_data",
    "BrowseData",
    "create_app",
    "serve",
]


def create_app(data: BrowseData, regex_budget_s: float = 2.0, access: Any = None) -> Any:
    """The FastAPI app serving ``data`` (see :mod:`codebook_lens.browse.app`); ``access``
    guards it (Host, Origin and token checks, :mod:`codebook_lens.browse.access`)."""
    from codebook_lens.browse.app import create_app as _create

    return _create(data, regex_budget_s, access=access)


def serve(*args: Any, **kwargs: Any) -> None:
    """Serve a DIR with uvicorn (see :func:`codebook_lens.browse.server.serve`)."""
    from codebook_lens.browse.server import serve as _serve

    _serve(*args, **kwargs)
