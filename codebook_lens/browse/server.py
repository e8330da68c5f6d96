"""Start the browser: load DIR, build the app, serve it with uvicorn, print the URL."""

from __future__ import annotations

import os
import sys
from typing import Any

__all__ = ["serve", "main", "add_arguments", "LOOPBACK"]

LOOPBACK = "127.0.0.1"
"""The default host: only this machine can connect."""


def serve(
    root: str | os.PathLike[str],
    store: str | os.PathLike[str] | None = None,
    model: str | os.PathLike[str] | None = None,
    host: str = LOOPBACK,
    port: int = 8765,
    log: Any = None,
) -> None:
    """Serve DIR (or ``store`` + ``model``) at ``http://host:port/`` until interrupted.

    Requests naming another host (DNS rebinding) and writes from another origin are refused;
    bound beyond loopback, the browser also needs the token printed in its URL
    (:mod:`codebook_lens.browse.access`)."""
    try:
        import uvicorn
    except ImportError as e:  # pragma: no cover - depends on the optional extra
        raise SystemExit(
            "codebook-lens browse needs the browse extra: pip install 'codebook-lens[browse]'"
        ) from e
    from codebook_lens.browse.access import WILDCARD_HOSTS, access_for, is_loopback
    from codebook_lens.browse.app import create_app
    from codebook_lens.browse.layout import load_browse_data

    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    access = access_for(host, port)  # a bad port fails before DIR is loaded
    data = load_browse_data(root, store, model)
    log(f"loaded {data.store.n_tokens:,} positions at {len(data.store.sites)} sites")
    app = create_app(data, access=access)
    if not is_loopback(host):
        log(f"warning: serving on {host}: other machines can reach this browser; it asks for "
            "the token in its URL")  # fmt: skip
    if host in WILDCARD_HOSTS:
        import socket

        log(f"from another machine: {access.url(socket.gethostname())}")
    print(f"codebook-lens browse: {access.url(host)}", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")


def main(argv: list[str] | None = None) -> int:
    """``python -m codebook_lens.browse DIR [--store S --model M] [--host H] [--port N]``."""
    import argparse

    p = argparse.ArgumentParser(prog="codebook-lens browse", description=serve.__doc__)
    add_arguments(p)
    args = p.parse_args(argv)
    serve(args.dir, args.store, args.model, args.host, args.port)
    return 0


def add_arguments(p: Any) -> None:
    """The ``browse`` arguments, shared with ``codebook-lens browse``."""
    p.add_argument("dir", help="output of codebook-lens demo / lm-demo (or any DIR with --store)")
    p.add_argument("--store", default=None, help="a saved CodeStore (instead of DIR/browse)")
    p.add_argument("--model", default=None, help="a saved CodebookModel (for the Lab)")
    p.add_argument("--host", default=LOOPBACK, help="interface to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8765)
