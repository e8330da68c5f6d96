"""Who may talk to the browser: the ``Host`` it serves, the ``Origin`` of writes, a token.

A web page the user visits can point its own domain name at 127.0.0.1 (DNS rebinding) and then
read the browser's API as same-origin. :class:`AccessGuard` refuses, with 403, a request whose
``Host`` header names anything but the address served (``127.0.0.1:PORT``, ``localhost:PORT``,
``[::1]:PORT``, and the bound address itself), and a state-changing request (POST, PUT, PATCH,
DELETE) whose ``Origin`` is not the page's own. Bound beyond loopback (``--host 0.0.0.0`` or a
LAN address), it also asks for a token, as Jupyter does: generated per launch and printed in the
URL (``/?token=...``); the first request with it gets a cookie (``HttpOnly``, ``SameSite=
Strict``) and is redirected to the same URL without it. ``Authorization: token <t>`` works too.
Bound to every interface (``0.0.0.0``, ``::``), any ``Host`` may reach it, so the token alone
guards it.
"""

from __future__ import annotations

import ipaddress
import json
import secrets
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from http.cookies import CookieError, SimpleCookie
from typing import Any
from urllib.parse import parse_qsl, urlencode

__all__ = ["Access", "AccessGuard", "access_for", "is_loopback", "WILDCARD_HOSTS"]

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

WILDCARD_HOSTS = ("0.0.0.0", "::", "")
"""Bind addresses meaning every interface."""

_LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
_SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` lets only this machine connect (``localhost``, 127.0.0.0/8,
    ``::1``)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _host_header(host: str, port: int) -> str:
    """How a client names ``host:port`` in a ``Host`` header (IPv6 in brackets)."""
    name = host.lower()
    if ":" in name and not name.startswith("["):
        name = f"[{name}]"
    return f"{name}:{port}"


@dataclass(frozen=True)
class Access:
    """What :class:`AccessGuard` lets in."""

    port: int
    """The port served."""
    hosts: frozenset[str] | None
    """Accepted ``Host`` header values (lower case, ``name:port``); None: any (a wildcard bind)."""
    token: str | None
    """The token a request must carry; None on loopback."""

    @property
    def cookie(self) -> str:
        """The cookie that holds the token (per port: cookies do not separate ports)."""
        return f"codebook_lens_token_{self.port}"

    def url(self, host: str) -> str:
        """The URL to open (with the token), for a bind address ``host``."""
        name = "127.0.0.1" if host in WILDCARD_HOSTS else host
        query = f"?token={self.token}" if self.token else ""
        return f"http://{_host_header(name, self.port)}/{query}"


def access_for(host: str, port: int, token: str | None = None) -> Access:
    """The :class:`Access` of a server bound to ``host:port``: loopback names only and no token
    on loopback; those plus ``host`` and a token (``token``, or a new random one) beyond it;
    any host and a token on every interface."""
    if not 0 < port < 65536:
        raise ValueError(f"port={port}; the browser needs a fixed port in [1, 65535]")
    names = {_host_header(n, port) for n in _LOOPBACK_NAMES}
    if port == 80:  # a client may leave the default port out
        names |= {n.rsplit(":", 1)[0] for n in names}
    if is_loopback(host):
        return Access(port, frozenset(names), None)
    token = token or secrets.token_urlsafe(32)
    if host in WILDCARD_HOSTS:
        return Access(port, None, token)
    return Access(port, frozenset(names | {_host_header(host, port)}), token)


class AccessGuard:
    """ASGI middleware enforcing an :class:`Access` in front of ``app``."""

    def __init__(self, app: Callable[..., Awaitable[None]], access: Access):
        self.app, self.access = app, access

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):  # lifespan events
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        refusal = self._refusal(scope, headers)
        if refusal is not None and scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})  # the server answers 403
            return
        if refusal is not None:
            await _reply(send, refusal[0], {"error": refusal[1]})
            return
        query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))
        if self.access.token and "token" in query and scope.get("method") in ("GET", "HEAD"):
            await self._redirect_with_cookie(scope, send, query)
            return
        await self.app(scope, receive, send)

    def _refusal(self, scope: Scope, headers: dict[str, str]) -> tuple[int, str] | None:
        """(status, message) when the request may not pass, else None."""
        acc, host = self.access, headers.get("host", "").lower()
        if acc.hosts is not None and host not in acc.hosts:
            return 403, (
                f"this code browser serves {sorted(acc.hosts)[0]}, not {host or 'no host'!r}: "
                "requests naming another host are refused (DNS rebinding protection). Open "
                f"the address codebook-lens browse printed"
            )
        origin = headers.get("origin")
        if scope.get("method", "GET") not in _SAFE_METHODS and origin is not None:
            if origin.lower() != f"http://{host}":
                return 403, (
                    f"a {scope.get('method')} from origin {origin!r} was refused: only this "
                    f"browser's own page (http://{host}) may change its state"
                )
        if acc.token and not self._has_token(scope, headers):
            return 401, (
                "this code browser is reachable beyond this machine and needs its token: open "
                "the URL codebook-lens browse printed (.../?token=...), or send 'Authorization: "
                "token <token>'"
            )
        return None

    def _has_token(self, scope: Scope, headers: dict[str, str]) -> bool:
        token = self.access.token or ""
        given = [v for k, v in parse_qsl(scope.get("query_string", b"").decode()) if k == "token"]
        auth = headers.get("authorization", "").split()
        if len(auth) == 2 and auth[0].lower() in ("token", "bearer"):
            given.append(auth[1])
        try:
            jar = SimpleCookie(headers.get("cookie", ""))
        except CookieError:
            jar = SimpleCookie()
        if self.access.cookie in jar:
            given.append(jar[self.access.cookie].value)
        return any(secrets.compare_digest(g.encode(), token.encode()) for g in given)

    async def _redirect_with_cookie(self, scope: Scope, send: Send, query: dict[str, str]) -> None:
        """The token is right: keep it in a cookie and take it out of the address bar."""
        rest = urlencode({k: v for k, v in query.items() if k != "token"})
        location = scope.get("path", "/") + (f"?{rest}" if rest else "")
        cookie = f"{self.access.cookie}={self.access.token}; Path=/; HttpOnly; SameSite=Strict"
        await send(
            {
                "type": "http.response.start",
                "status": 303,
                "headers": [
                    (b"location", location.encode("latin-1")),
                    (b"set-cookie", cookie.encode("latin-1")),
                    (b"content-length", b"0"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": b""})


async def _reply(send: Send, status: int, body: dict[str, Any]) -> None:
    data = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(data)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": data})
