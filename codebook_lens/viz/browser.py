"""Check an HTML page in a real headless browser (Chromium): did it render, did anything fail?

:func:`check_page` opens a local file in headless Chromium, driven over the DevTools protocol
through a pipe (``--remote-debugging-pipe``: no port, no extra packages). It records every
network request and every failed one (``Network.loadingFailed``), console errors, uncaught
exceptions and Content-Security-Policy refusals, counts the circuitsvis views that rendered, and
takes a full-page screenshot. By default host name resolution is disabled
(``--host-resolver-rules``), so the page is checked as it would load on an offline machine: a
CDN script fails with ``net::ERR_NAME_NOT_RESOLVED`` even where the network is up.

Needs a Chromium binary (Debian: ``apt-get install -y chromium``); :func:`find_chromium` finds
one. Used by the test suite; also handy as ``python -m codebook_lens.viz.browser report.html``.
"""

from __future__ import annotations

import base64
import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from codebook_lens.atomic import write_file

__all__ = ["BrowserCheck", "DevToolsPipe", "check_page", "find_chromium", "CHROMIUM_NAMES"]

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
"""Executable names :func:`find_chromium` looks for on ``PATH``, in order."""

_LOCAL_SCHEMES = ("file:", "data:", "about:", "blob:", "chrome:", "devtools:")


def find_chromium() -> str | None:
    """Path of a Chromium/Chrome executable on ``PATH`` (``$CHROMIUM`` wins), or None."""
    env = os.environ.get("CHROMIUM")
    if env:
        return shutil.which(env) or (env if Path(env).is_file() else None)
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


@dataclass
class BrowserCheck:
    """What happened when a page loaded in headless Chromium."""

    url: str
    """The page's ``file://`` URL."""

    requests: list[str] = field(default_factory=list)
    """Every URL the page requested (the page itself included)."""

    failed: list[str] = field(default_factory=list)
    """Requests that failed or were blocked: ``"url: net::ERR_..."``."""

    console_errors: list[str] = field(default_factory=list)
    """Console and browser-log errors (CSP refusals, failed loads, ``console.error``)."""

    exceptions: list[str] = field(default_factory=list)
    """Uncaught JavaScript exceptions."""

    views_total: int = 0
    """circuitsvis containers on the page (``div.cl-cv``)."""

    views_rendered: int = 0
    """Of those, how many the JavaScript filled with content."""

    screenshot: Path | None = None
    """The full-page PNG, if one was asked for."""

    @property
    def external_requests(self) -> list[str]:
        """Requested URLs that are not local (``file:``, ``data:``, ``about:``, ``blob:``)."""
        return [u for u in self.requests if not u.startswith(_LOCAL_SCHEMES)]

    @property
    def problems(self) -> list[str]:
        """Everything that went wrong, one line each (empty: the page is fine offline)."""
        out = [f"failed request: {f}" for f in self.failed]
        out += [f"network request: {u}" for u in self.external_requests]
        out += [f"console error: {e}" for e in self.console_errors]
        out += [f"exception: {e}" for e in self.exceptions]
        if self.views_rendered < self.views_total:
            out.append(f"only {self.views_rendered} of {self.views_total} views rendered")
        return out

    @property
    def ok(self) -> bool:
        """True when :attr:`problems` is empty."""
        return not self.problems


class DevToolsPipe:
    """The DevTools protocol over Chromium's ``--remote-debugging-pipe`` (fds 3 and 4 mapped to
    the process's stdin/stdout): JSON messages separated by NUL bytes. Replies to :meth:`call`
    are matched by id; every other message (an event) goes to :attr:`events`."""

    def __init__(self, proc: subprocess.Popen[bytes]):
        self.proc = proc
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.replies: dict[int, dict[str, Any]] = {}
        self.cond = threading.Condition()
        self.next_id = 0
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        buf = b""
        assert self.proc.stdout is not None
        while chunk := self.proc.stdout.read1(65536):
            buf += chunk
            *msgs, buf = buf.split(b"\0")
            for raw in msgs:
                msg = json.loads(raw)
                if "id" in msg:
                    with self.cond:
                        self.replies[msg["id"]] = msg
                        self.cond.notify_all()
                else:
                    self.events.put(msg)
        with self.cond:
            self.cond.notify_all()

    def call(
        self, method: str, params: dict[str, Any] | None = None, session: str | None = None,
        timeout: float = 30.0,
    ) -> dict[str, Any]:  # fmt: skip
        self.next_id += 1
        msg: dict[str, Any] = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(msg).encode() + b"\0")
        self.proc.stdin.flush()
        deadline = time.monotonic() + timeout
        with self.cond:
            while self.next_id not in self.replies:
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise TimeoutError(f"chromium did not answer {method} within {timeout:.0f} s")
                self.cond.wait(left)
            reply = self.replies.pop(self.next_id)
        if "error" in reply:
            raise RuntimeError(f"chromium: {method} failed: {reply['error']}")
        return reply.get("result", {})


def _evaluate(pipe: DevToolsPipe, session: str, expression: str) -> Any:
    r = pipe.call(
        "Runtime.evaluate", {"expression": expression, "returnByValue": True}, session=session
    )
    return r.get("result", {}).get("value")


_COUNT_VIEWS = (
    "JSON.stringify([document.querySelectorAll('div.cl-cv').length,"
    "Array.from(document.querySelectorAll('div.cl-cv')).filter(e => e.childElementCount > 0"
    " && e.getBoundingClientRect().height > 0).length])"
)


def _chromium_args(exe: str, profile: str, width: int, offline: bool) -> list[str]:
    args = [
        exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--no-default-browser-check", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--disable-extensions",
        "--disable-default-apps", "--disable-dev-shm-usage", "--mute-audio",
        "--hide-scrollbars", f"--user-data-dir={profile}", f"--window-size={width},1000",
        "--remote-debugging-pipe",
    ]  # fmt: skip
    if offline:
        args.append("--host-resolver-rules=MAP * ~NOTFOUND")
    args.append("about:blank")
    return args


def _close(proc: subprocess.Popen[bytes]) -> None:
    try:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=10)
    except (subprocess.TimeoutExpired, OSError):
        proc.kill()
        proc.wait()


def check_page(
    path: str | os.PathLike[str],
    screenshot: str | os.PathLike[str] | None = None,
    width: int = 1280,
    max_height: int = 8000,
    offline: bool = True,
    settle_s: float = 1.0,
    timeout_s: float = 60.0,
    chromium: str | None = None,
) -> BrowserCheck:
    """Load the local HTML file ``path`` in headless Chromium and report what happened.

    ``screenshot`` writes a full-page PNG (``width`` wide, at most ``max_height`` tall).
    ``offline`` makes every host name unresolvable, so any network fetch fails as it would
    offline. After the load event the page gets ``settle_s`` seconds of quiet (no new events)
    for scripts to render. Raises ``FileNotFoundError`` without a Chromium (install one, e.g.
    ``apt-get install -y chromium``, or set ``$CHROMIUM``).
    """
    exe = chromium or find_chromium()
    if exe is None:
        raise FileNotFoundError(
            "no Chromium found on PATH (looked for " + ", ".join(CHROMIUM_NAMES) + "); install "
            "one (Debian/Ubuntu: apt-get install -y chromium) or set $CHROMIUM"
        )
    page = Path(path).resolve()
    if not page.is_file():
        raise FileNotFoundError(page)
    result = BrowserCheck(url=page.as_uri())
    with tempfile.TemporaryDirectory(prefix="cl-chromium-") as profile:
        args = _chromium_args(exe, profile, width, offline)
        # Chromium talks the protocol on fds 3 (in) and 4 (out): map them to our pipes.
        shell = 'exec "$@" 3<&0 4>&1 0</dev/null 1>/dev/null'
        proc = subprocess.Popen(
            ["sh", "-c", shell, "sh", *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            _drive(
                DevToolsPipe(proc), result, page, screenshot, width, max_height, settle_s, timeout_s
            )
        finally:
            _close(proc)
    return result


def _attach(pipe: DevToolsPipe, deadline: float) -> str:
    """Wait for Chromium's first page target and attach to it; returns the session id."""
    target = None
    while target is None:
        pages = [t for t in pipe.call("Target.getTargets")["targetInfos"] if t["type"] == "page"]
        target = pages[0] if pages else None
        if target is None:
            if time.monotonic() > deadline:
                raise TimeoutError("chromium opened no page")
            time.sleep(0.1)
    return pipe.call("Target.attachToTarget", {"targetId": target["targetId"], "flatten": True})[
        "sessionId"
    ]


def _wait_loaded(
    pipe: DevToolsPipe, result: BrowserCheck, urls: dict[str, str], settle_s: float,
    deadline: float,
) -> bool:  # fmt: skip
    """Record events until the load event plus ``settle_s`` of quiet; False if it never loaded."""
    loaded = False
    quiet_since = time.monotonic()
    while time.monotonic() < deadline:
        try:
            ev = pipe.events.get(timeout=0.1)
        except queue.Empty:
            if loaded and time.monotonic() - quiet_since >= settle_s:
                break
            if pipe.proc.poll() is not None:
                raise RuntimeError("chromium exited while loading the page") from None
            continue
        quiet_since = time.monotonic()
        _record(ev, result, urls)
        if ev.get("method") == "Page.loadEventFired":
            loaded = True
    return loaded


def _screenshot(
    pipe: DevToolsPipe, session: str, metrics: dict[str, Any], max_height: int,
    path: str | os.PathLike[str],
) -> Path:  # fmt: skip
    """A full-page PNG at ``path``: the viewport grown to the page's height first."""
    h = int(_evaluate(pipe, session, "document.documentElement.scrollHeight") or 1000)
    h = max(200, min(h, max_height))
    pipe.call("Emulation.setDeviceMetricsOverride", {**metrics, "height": h}, session=session)
    time.sleep(0.2)
    shot = pipe.call("Page.captureScreenshot", {"format": "png"}, session=session)
    return write_file(path, base64.b64decode(shot["data"]))  # creates the parents


def _drive(
    pipe: DevToolsPipe, result: BrowserCheck, page: Path,
    screenshot: str | os.PathLike[str] | None, width: int, max_height: int, settle_s: float,
    timeout_s: float,
) -> None:  # fmt: skip
    deadline = time.monotonic() + timeout_s
    session = _attach(pipe, deadline)
    for domain in ("Page", "Network", "Runtime", "Log"):
        pipe.call(f"{domain}.enable", session=session)
    metrics = {"width": width, "height": 1000, "deviceScaleFactor": 1, "mobile": False}
    pipe.call("Emulation.setDeviceMetricsOverride", metrics, session=session)
    pipe.call("Page.navigate", {"url": result.url}, session=session)
    urls: dict[str, str] = {}
    if not _wait_loaded(pipe, result, urls, settle_s, deadline):
        raise TimeoutError(f"{page} did not finish loading within {timeout_s:.0f} s")
    while True:  # React renders asynchronously: wait until every view has content
        total, rendered = json.loads(_evaluate(pipe, session, _COUNT_VIEWS))
        if rendered >= total or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    result.views_total, result.views_rendered = int(total), int(rendered)
    if screenshot is not None:
        result.screenshot = _screenshot(pipe, session, metrics, max_height, screenshot)
    while not pipe.events.empty():  # events that arrived while we measured
        _record(pipe.events.get_nowait(), result, urls)
    try:
        pipe.call("Browser.close", timeout=5)
    except (TimeoutError, RuntimeError, OSError):
        pass


def _record(ev: dict[str, Any], result: BrowserCheck, urls: dict[str, str]) -> None:
    method, p = ev.get("method"), ev.get("params", {})
    if method == "Network.requestWillBeSent":
        url = p["request"]["url"]
        url = url if len(url) <= 120 else url[:100] + f"...({len(url)} chars)"
        urls[p["requestId"]] = url
        result.requests.append(url)
    elif method == "Network.loadingFailed":
        why = p.get("errorText") or ""
        if p.get("blockedReason"):
            why += f" (blocked: {p['blockedReason']})"
        result.failed.append(f"{urls.get(p['requestId'], p['requestId'])}: {why}")
    elif method == "Log.entryAdded" and p["entry"]["level"] == "error":
        e = p["entry"]
        result.console_errors.append(f"[{e.get('source')}] {e.get('text')} {e.get('url', '')}")
    elif method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
        args = [str(a.get("value", a.get("description", ""))) for a in p.get("args", [])]
        result.console_errors.append("console." + p["type"] + ": " + " ".join(args))
    elif method == "Runtime.exceptionThrown":
        d = p["exceptionDetails"]
        result.exceptions.append(d.get("exception", {}).get("description") or d.get("text", ""))


def main(argv: list[str] | None = None) -> int:
    """``python -m codebook_lens.viz.browser PAGE.html [SCREENSHOT.png]``: print problems."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print(main.__doc__)
        return 2
    r = check_page(argv[0], screenshot=argv[1] if len(argv) > 1 else None)
    print(f"{r.url}: {len(r.requests)} requests, views {r.views_rendered}/{r.views_total}")
    for line in r.problems:
        print("  " + line)
    print("OK" if r.ok else "PROBLEMS")
    return 0 if r.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
