"""Latency of the code browser over HTTP, on a synthetic store of ~1M token positions.

    python benchmarks/bench_browse.py                       # 8192 x 128 = 1,048,576 positions
    python benchmarks/bench_browse.py --n-seq 512 --requests 10   # a quick run

Builds a browse DIR (random Zipf-distributed codes at the TokFSM placement: ``attn.hook_z``
with 4 heads and ``hook_mlp_out`` in each of 4 layers, 1000 codes each, k=1; 100 labels; a
1024-token vocabulary of word pieces; a random 4-layer d_model=128 model with the same
codebooks), starts ``python -m codebook_lens.browse DIR`` as a server process on a free
loopback port, and drives it with plain HTTP requests: code pages (the page JSON plus its
effects), searches (regex with and without a capture group, token, label), lab runs on a
128-token prompt with an intervention (16 sampled tokens), then 8 concurrent clients mixing
all of them. Prints p50/p95 per endpoint, the targets, and the error count.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import load_line, print_table  # noqa: E402

__all__ = ["main", "build_dir"]

TARGETS = {"code page": 0.200, "search": 0.500, "lab (128 tokens)": 1.0}
N_LAYERS, N_HEADS, N_CODES = 4, 4, 1000


def _vocab(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    letters = "etaoinshrdlucmfwyp"
    out = [str(i) for i in range(10)]
    while len(out) < n:
        w = "".join(rng.choice(letters) for _ in range(rng.randint(1, 6)))
        out.append((" " if rng.random() < 0.5 else "") + w)
    return out


def build_dir(path: Path, n_seq: int, seq_len: int, d_vocab: int = 1024) -> Path:
    """Write the synthetic browse DIR (store, labels, model) to ``path``."""
    from codebook_lens.browse.synthetic import (
        make_browse_dir,
        model_sites,
        random_store,
        tiny_model,
    )

    sites = model_sites(N_LAYERS, N_HEADS, N_CODES)
    store = random_store(n_seq, seq_len, sites, d_vocab, seed=0)
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 100, (n_seq, seq_len), generator=g)
    labels[:, ::2] = -1
    cm = tiny_model(N_LAYERS, 128, N_HEADS, d_vocab, n_ctx=seq_len + 32, n_codes=N_CODES)
    names = [f"state {i:02d}" for i in range(100)]
    return make_browse_dir(path, store, cm, labels, names, _vocab(d_vocab))


class Client:
    """Plain HTTP against the server; records seconds per call and errors per endpoint."""

    def __init__(self, base: str):
        self.base = base
        self.times: dict[str, list[float]] = {}
        self.errors: list[str] = []
        self.lock = threading.Lock()

    def call(self, name: str, path: str, body: dict | None = None) -> None:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        t0 = time.perf_counter()
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                r.read()
        except (urllib.error.URLError, OSError) as e:
            with self.lock:
                self.errors.append(f"{name} {path[:80]}: {e}")
            return
        with self.lock:
            self.times.setdefault(name, []).append(time.perf_counter() - t0)


def _requests(rng: random.Random, vocab: list[str], seq_len: int) -> dict[str, list]:
    """Callables per endpoint group: code page, search, lab."""
    sites = [s for layer in range(N_LAYERS) for s in
             (f"blocks.{layer}.attn.hook_z", f"blocks.{layer}.hook_mlp_out")]  # fmt: skip

    def code_page(c: Client) -> None:
        site = rng.choice(sites)
        head = rng.randrange(N_HEADS) if "attn" in site else 0
        code = min(int(rng.expovariate(1 / 50)), N_CODES - 1)  # mostly used codes
        p = f"/api/code/{urllib.parse.quote(site)}/{head}/{code}"
        c.call("code page", p)
        c.call("code page effects", p + "/effects")

    searches = [("regex", r"e(t)"), ("regex", r" s\w*n"), ("regex", r"\d"), ("token", " e"),
                ("label", "state 07"), ("regex", r"(ta)o")]  # fmt: skip

    def search(c: Client) -> None:
        kind, q = rng.choice(searches)
        params = {"kind": kind, "q": q, "by": rng.choice(["f1", "precision", "count"]),
                  "min_count": 5, "limit": 25, "offset": rng.choice([0, 25])}  # fmt: skip
        c.call("search", "/api/search?" + urllib.parse.urlencode(params))

    def lab(c: Client) -> None:
        prompt = " ".join(str(rng.randrange(len(vocab))) for _ in range(128))
        iv = {"site": rng.choice(sites), "action": "force", "code": rng.randrange(N_CODES),
              "positions": [-1, -2]}  # fmt: skip
        c.call("lab (128 tokens)", "/api/lab", {"prompt": prompt, "interventions": [iv],
                                                "n_new": 16, "seed": 0})  # fmt: skip

    return {"code page": [code_page], "search": [search], "lab (128 tokens)": [lab]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(d: Path, port: int) -> tuple[subprocess.Popen, float]:
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "codebook_lens.browse", str(d), "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/tokens", timeout=2).read()
            return proc, time.perf_counter() - t0
        except (urllib.error.URLError, OSError):
            if proc.poll() is not None:
                raise RuntimeError(f"server exited: {proc.stdout.read()}") from None
            time.sleep(0.5)
    proc.kill()
    raise TimeoutError("server did not start")


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print the tables; exit 1 if a target is missed or a request failed."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-seq", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--requests", type=int, default=40, help="sequential requests per endpoint")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--dir", default=None, help="reuse / keep the DIR here")
    args = ap.parse_args(argv)
    rng = random.Random(0)
    with tempfile.TemporaryDirectory(prefix="bench-browse-") as tmp:
        d = Path(args.dir) if args.dir else Path(tmp) / "dir"
        t0 = time.perf_counter()
        if not (d / "browse" / "browse.json").exists():
            build_dir(d, args.n_seq, args.seq_len)
        print(f"built DIR in {time.perf_counter() - t0:.1f} s; {load_line()}")
        port = _free_port()
        proc, started = _start(d, port)
        try:
            print(f"server ready in {started:.1f} s ({args.n_seq * args.seq_len:,} positions)")
            vocab = _vocab(1024)
            groups = _requests(rng, vocab, args.seq_len)
            seq = Client(f"http://127.0.0.1:{port}")
            for fns in groups.values():  # warm-up (loads the model)
                fns[0](seq)
            seq.times.clear()
            for _ in range(args.requests):
                for fns in groups.values():
                    fns[0](seq)
            conc = Client(f"http://127.0.0.1:{port}")
            mix = [f for fns in groups.values() for f in fns]

            def worker(i: int) -> None:
                r = random.Random(100 + i)
                for _ in range(max(4, args.requests // 4)):
                    r.choice(mix)(conc)

            threads = [threading.Thread(target=worker, args=(i,)) for i in range(args.clients)]
            t1 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - t1
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    rows, ok = [], not seq.errors and not conc.errors
    for name, xs in seq.times.items():
        target = TARGETS.get(name)
        p95 = _pct(xs, 0.95)
        if target is not None and p95 > target:
            ok = False
        rows.append((name, len(xs), f"{1000 * statistics.median(xs):.0f}", f"{1000 * p95:.0f}",
                     f"{1000 * target:.0f}" if target else ""))  # fmt: skip
    print("\nsequential (one client)")
    print_table(["endpoint", "n", "p50 ms", "p95 ms", "target p95 ms"], rows)
    crow = [(name, len(xs), f"{1000 * statistics.median(xs):.0f}", f"{1000 * _pct(xs, 0.95):.0f}")
            for name, xs in conc.times.items()]  # fmt: skip
    print(f"\n{args.clients} concurrent clients ({wall:.1f} s wall)")
    print_table(["endpoint", "n", "p50 ms", "p95 ms"], crow)
    errors = seq.errors + conc.errors
    print(f"\nerrors: {len(errors)}" + "".join(f"\n  {e}" for e in errors[:10]))
    print("targets met" if ok else "TARGETS MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
