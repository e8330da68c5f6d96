"""The browser answers only the address it serves (DNS rebinding), takes writes only from its
own page, and asks for its token when reachable beyond loopback: tested against a real uvicorn
server (a thread, and `python -m codebook_lens.browse` in a subprocess) with real HTTP requests."""

from __future__ import annotations

import functools
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from codebook_lens.browse import load_browse_data  # noqa: E402
from codebook_lens.browse.access import access_for, is_loopback  # noqa: E402
from codebook_lens.browse.app import create_app  # noqa: E402
from tests.integration.browse_helpers import tiny_dir  # noqa: E402

pytestmark = [pytest.mark.bridge, pytest.mark.timeout(300)]

EVIL = "evil.example.com"
TIMEOUT = httpx.Timeout(120.0)  # the first Lab or overview call loads the model, on a busy CI
_get = functools.partial(httpx.get, timeout=TIMEOUT)
_post = functools.partial(httpx.post, timeout=TIMEOUT)
_delete = functools.partial(httpx.delete, timeout=TIMEOUT)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def browse_dir(tmp_path_factory):
    return tiny_dir(tmp_path_factory.mktemp("browse"))


@pytest.fixture(scope="module")
def served(browse_dir):
    """The guarded app on 127.0.0.1:PORT in a uvicorn thread; yields (base URL, port)."""
    port = _free_port()
    app = create_app(load_browse_data(browse_dir), access=access_for("127.0.0.1", port))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", port
    server.should_exit = True
    thread.join(timeout=10)


@pytest.mark.parametrize("path", ["/api/overview", "/", "/static/app.js", "/api/context/0"])
def test_a_foreign_host_is_refused(served, path):
    url, port = served
    for host in (EVIL, f"{EVIL}:{port}", f"127.0.0.1:{port + 1}", "127.0.0.1.evil.example.com"):
        r = _get(url + path, headers={"Host": host})
        assert r.status_code == 403, (host, r.status_code)
        assert "DNS rebinding" in r.json()["error"]


def test_the_served_names_are_answered(served):
    url, port = served
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", f"LOCALHOST:{port}"):
        r = _get(url + "/api/overview", headers={"Host": host})
        assert r.status_code == 200, host
        assert r.json()["n_tokens"] > 0


def _bookmarks(url: str) -> list:
    return _get(url + "/api/bookmarks").json()["bookmarks"]


def test_writes_from_another_origin_are_refused(served):
    url, port = served
    mark = {"site": load_sites(url)[0], "head": 0, "code": 1, "note": "x"}
    before = _bookmarks(url)
    for origin in (
        f"http://{EVIL}",
        "null",
        f"http://localhost:{port}",
        f"https://127.0.0.1:{port}",
    ):
        r = _post(url + "/api/bookmarks", json=mark, headers={"Origin": origin})
        assert r.status_code == 403, origin
        assert "only this browser's own page" in r.json()["error"]
        r = _post(url + "/api/lab", json={"prompt": "1 2"}, headers={"Origin": origin})
        assert r.status_code == 403
    assert _bookmarks(url) == before  # nothing was written
    ok = _post(url + "/api/bookmarks", json=mark, headers={"Origin": f"http://127.0.0.1:{port}"})
    assert ok.status_code == 200
    added = ok.json()["id"]
    r = _delete(f"{url}/api/bookmarks/{added}", headers={"Origin": f"http://{EVIL}"})
    assert r.status_code == 403 and any(b["id"] == added for b in _bookmarks(url))
    r = _delete(f"{url}/api/bookmarks/{added}")  # a script without Origin (curl) may write
    assert r.status_code == 200 and not any(b["id"] == added for b in _bookmarks(url))
    r = _get(url + "/api/overview", headers={"Origin": f"http://{EVIL}"})
    assert r.status_code == 200  # reads are guarded by Host; the browser keeps their content


def load_sites(url: str) -> list[str]:
    return [s["site"] for s in _get(url + "/api/overview").json()["sites"]]


def test_access_for_each_kind_of_bind():
    loop = access_for("127.0.0.1", 8765)
    assert loop.token is None and loop.hosts == {"127.0.0.1:8765", "localhost:8765", "[::1]:8765"}
    assert access_for("::1", 8765).hosts == loop.hosts and is_loopback("127.0.0.2")
    lan = access_for("192.168.1.5", 8765)
    assert lan.token and "192.168.1.5:8765" in lan.hosts and "127.0.0.1:8765" in lan.hosts
    assert lan.token != access_for("192.168.1.5", 8765).token  # a new token per launch
    anywhere = access_for("0.0.0.0", 8765)
    assert anywhere.hosts is None and anywhere.token
    assert anywhere.url("0.0.0.0") == f"http://127.0.0.1:8765/?token={anywhere.token}"
    assert "localhost" in access_for("localhost", 80).hosts
    with pytest.raises(ValueError, match="port=0"):
        access_for("127.0.0.1", 0)


@pytest.fixture(scope="module")
def open_server(browse_dir):
    """`python -m codebook_lens.browse DIR --host 0.0.0.0`: yields (base URL, printed URL)."""
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "codebook_lens.browse", str(browse_dir), "--host", "0.0.0.0",
         "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        line = proc.stdout.readline()
        m = re.search(r"(http://\S+)", line)
        assert m, (line, proc.stderr.read() if proc.poll() is not None else "")
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                _get(base + "/api/overview")
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read()
                time.sleep(0.1)
        yield base, m.group(1)
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_beyond_loopback_the_token_is_required(open_server):
    base, printed = open_server
    token = re.search(r"\?token=([\w-]+)$", printed).group(1)
    assert printed.startswith(base) and len(token) >= 32
    for headers in ({}, {"Authorization": "token wrong"}, {"Cookie": "codebook_lens_token_1=x"}):
        r = _get(base + "/api/overview", headers=headers)
        assert r.status_code == 401 and "needs its token" in r.json()["error"]
    assert _get(base + "/?token=wrong").status_code == 401
    assert _get(base + "/api/overview", headers={"Host": EVIL}).status_code == 401
    with httpx.Client(
        base_url=base, timeout=TIMEOUT
    ) as client:  # a browser: follows redirects, keeps cookies
        r = client.get(f"/?token={token}", follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/"
        assert (
            "HttpOnly" in r.headers["set-cookie"] and "SameSite=Strict" in r.headers["set-cookie"]
        )
        page = client.get("/")
        assert page.status_code == 200 and "<html" in page.text.lower()
        assert client.get("/api/overview").status_code == 200
        sites = client.get("/api/overview").json()["sites"]
        mark = {"site": sites[0]["site"], "head": 0, "code": 2}
        r = client.post("/api/bookmarks", json=mark, headers={"Origin": base})
        assert r.status_code == 200
        r = client.post("/api/bookmarks", json=mark, headers={"Origin": f"http://{EVIL}"})
        assert r.status_code == 403
    auth = _get(base + "/api/overview", headers={"Authorization": f"token {token}"})
    assert auth.status_code == 200


def _page():
    from codebook_lens.viz.browser import find_chromium
    from tests.integration.browse_helpers import Page

    exe = find_chromium()
    if exe is None:
        pytest.skip("no Chromium on PATH (apt-get install -y chromium, or set $CHROMIUM)")
    return Page(exe)


_POST_BOOKMARK = """window._status = null;
fetch('/api/bookmarks', {method: 'POST', headers: {'Content-Type': 'application/json'},
  body: JSON.stringify({site: %r, head: 0, code: 3})}).then(r => window._status = r.status);"""


@pytest.mark.parametrize("which", ["loopback", "token"])
def test_the_real_page_works_behind_the_guard(request, which):
    """Chromium opens the printed URL: the page renders and its own writes (which carry the
    page's Origin) go through, with the token kept in a cookie."""
    if which == "loopback":
        base, _ = request.getfixturevalue("served")
        start = base + "/#/overview"
    else:
        base, start = request.getfixturevalue("open_server")
    page = _page()
    try:
        page.goto(start)
        page.ready("overview")
        assert "?token=" not in page.js("location.href")  # redirected away from the token
        token = re.search(r"token=([\w-]+)", start)
        auth = {"Authorization": f"token {token.group(1)}"} if token else {}
        site = _get(base + "/api/overview", headers=auth).json()["sites"][0]["site"]
        page.js(_POST_BOOKMARK % site)
        assert page.wait("window._status") == 200
        assert not page.exceptions
    finally:
        page.close()
