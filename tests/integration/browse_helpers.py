"""Helpers of the browser tests: a tiny browse DIR, a live uvicorn server, a CDP page driver."""

from __future__ import annotations

import base64
import json
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

from codebook_lens.viz.browser import DevToolsPipe

__all__ = ["tiny_dir", "LiveServer", "Page"]


def tiny_dir(path: Path, n_seq: int = 40, seq_len: int = 24) -> Path:
    """A browse DIR: a tiny random model with codebooks, its codes over random tokens, labels."""
    from codebook_lens.analysis import collect_codes
    from codebook_lens.browse.synthetic import make_browse_dir, tiny_model

    cm = tiny_model()
    g = torch.Generator().manual_seed(0)
    toks = torch.randint(0, 10, (n_seq, seq_len), generator=g)
    toks[:, 0] = 10
    store = collect_codes(cm, toks, progress=False)
    labels = torch.where(toks < 5, toks, torch.full_like(toks, -1))
    vocab = [str(i) for i in range(10)] + ["<bos>"]
    names = [f"digit{i}" for i in range(5)]
    return make_browse_dir(path, store, cm, labels, names, vocab)


class LiveServer:
    """The app served by uvicorn on a free loopback port, in a thread."""

    def __init__(self, app: Any):
        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        cfg = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(cfg)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline:
                raise TimeoutError("uvicorn did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


class Page:
    """One headless Chromium page over the DevTools pipe: navigate, evaluate, click, capture.

    Every request the page makes is recorded in :attr:`requests`.
    """

    def __init__(self, chromium: str, width: int = 1280, height: int = 900):
        self.profile = tempfile.TemporaryDirectory(prefix="cl-browse-")
        args = [
            chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-extensions", "--disable-default-apps", "--disable-dev-shm-usage",
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
            f"--user-data-dir={self.profile.name}",
            f"--window-size={width},{height}", "--remote-debugging-pipe", "about:blank",
        ]  # fmt: skip
        shell = 'exec "$@" 3<&0 4>&1 0</dev/null 1>/dev/null'
        self.proc = subprocess.Popen(
            ["sh", "-c", shell, "sh", *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self.pipe = DevToolsPipe(self.proc)
        self.session: str | None = None
        self._requests: list[str] = []
        self._exceptions: list[str] = []
        target = None
        deadline = time.monotonic() + 30
        while target is None:
            pages = [
                t for t in self.call("Target.getTargets")["targetInfos"] if t["type"] == "page"
            ]
            target = pages[0] if pages else None
            if target is None and time.monotonic() > deadline:
                raise TimeoutError("chromium opened no page")
            time.sleep(0.05)
        r = self.call("Target.attachToTarget", {"targetId": target["targetId"], "flatten": True})
        self.session = r["sessionId"]
        for domain in ("Page", "Network", "Runtime"):
            self.call(f"{domain}.enable", session=True)
        metrics = {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}
        self.call("Emulation.setDeviceMetricsOverride", metrics, session=True)
        self.width = width

    def _drain(self) -> None:
        """Record the page's requests and JavaScript exceptions from the pipe's events."""
        while not self.pipe.events.empty():
            msg = self.pipe.events.get_nowait()
            if msg.get("method") == "Network.requestWillBeSent":
                self._requests.append(msg["params"]["request"]["url"])
            elif msg.get("method") == "Runtime.exceptionThrown":
                d = msg["params"]["exceptionDetails"]
                self._exceptions.append(d.get("exception", {}).get("description", ""))

    @property
    def requests(self) -> list[str]:
        """Every URL the page requested so far."""
        self._drain()
        return self._requests

    @property
    def exceptions(self) -> list[str]:
        """Every uncaught JavaScript exception so far."""
        self._drain()
        return self._exceptions

    def call(self, method: str, params: dict | None = None, session: bool = False) -> dict:
        return self.pipe.call(method, params, session=self.session if session else None)

    def js(self, expr: str) -> Any:
        r = self.call("Runtime.evaluate", {"expression": expr, "returnByValue": True}, True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expr}: {r['exceptionDetails']}")
        return r.get("result", {}).get("value")

    def wait(self, expr: str, timeout: float = 20.0) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            v = self.js(expr)
            if v:
                return v
            time.sleep(0.1)
        raise TimeoutError(f"page never satisfied {expr!r}; body: {self.text()[:500]}")

    def text(self) -> str:
        return self.js("document.body.innerText") or ""

    def goto(self, url: str) -> None:
        self.call("Page.navigate", {"url": url}, True)

    def ready(self, view: str) -> None:
        """Wait until the router has rendered ``view``."""
        self.wait(
            f"document.getElementById('view') && document.getElementById('view').dataset.view"
            f" === '{view}' && document.getElementById('view').dataset.ready === '1'"
        )

    def click(self, selector: str) -> None:
        self.js(f"document.querySelector({json.dumps(selector)}).click()")

    def screenshot(self, path: Path) -> None:
        h = int(self.js("document.documentElement.scrollHeight") or 900)
        m = {"width": self.width, "height": max(400, min(h, 6000)), "deviceScaleFactor": 1,
             "mobile": False}  # fmt: skip
        self.call("Emulation.setDeviceMetricsOverride", m, True)
        time.sleep(0.2)
        shot = self.call("Page.captureScreenshot", {"format": "png"}, True)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(shot["data"]))
        m["height"] = 900
        self.call("Emulation.setDeviceMetricsOverride", m, True)

    def close(self) -> None:
        try:
            self.call("Browser.close")
        except (TimeoutError, RuntimeError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.profile.cleanup()
