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
import shutil
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
from torch import Tensor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import load_line, print_table  # noqa: E402

__all__ = ["main", "build_dir", "write_big_store"]

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


# ---------------------------------------------------------------- the large-store mode (issue 20)
BIG_SITE, BIG_HEADS, BIG_K, BIG_CODES, BIG_VOCAB = "blocks.0.attn.hook_z", 8, 8, 10_000, 50_000
BIG_TARGETS = {"code page": 0.300, "search (regex)": 1.0, "search (token)": 1.0}


def _power_codes(g: torch.Generator, shape: tuple[int, ...], n: int, a: float = 3.0) -> Tensor:
    """Zipf-like code ids: ``floor(n * u**a)`` (code 0 most used; about 1/a of codes take half
    the firings), drawn per head with a head-specific shift so heads differ."""
    u = torch.rand(shape, generator=g)
    c = (u.pow_(a).mul_(n)).long().clamp_(max=n - 1)
    shift = torch.arange(shape[2]).view(1, 1, -1, 1) * 997
    return ((c + shift) % n).to(torch.int16)


def write_big_store(
    path: Path, n_positions: int, seq_len: int = 128, shard_seqs: int = 4096
) -> Path:
    """Write a store of ``n_positions`` (whole sequences) at one per-head site (8 heads, k=8,
    10,000 codes, a 50k vocabulary) through the store writer, one shard in memory at a time."""
    from codebook_lens.analysis.store import count_codes
    from codebook_lens.analysis.store_files import write_store_shard
    from codebook_lens.analysis.store_writer import StoreWriter

    n_seq = n_positions // seq_len
    settings = {
        "sites": [BIG_SITE], "n_codes": {BIG_SITE: BIG_CODES}, "per_head": {BIG_SITE: True},
        "dtypes": {BIG_SITE: "int16"}, "shapes": {BIG_SITE: [0, seq_len, BIG_HEADS, BIG_K]},
        "seq_len": seq_len, "has_tokens": True, "token_dtype": "int32", "d_vocab": BIG_VOCAB,
        "shard_seqs": shard_seqs,
    }  # fmt: skip
    collect = {"data": {"synthetic": "bench_browse"}, "codebooks": "synthetic", "max_seqs": n_seq}
    w = StoreWriter.begin(path, settings, collect, resume=False, default_shard_seqs=shard_seqs)
    try:
        w.prepare()
        g = torch.Generator().manual_seed(0)
        for i, a in enumerate(range(0, n_seq, shard_seqs)):
            n = min(shard_seqs, n_seq - a)
            codes = _power_codes(g, (n, seq_len, BIG_HEADS, BIG_K), BIG_CODES)
            tok = (torch.rand(n, seq_len, generator=g).pow_(2.0) * BIG_VOCAB).to(torch.int32)
            counts = {BIG_SITE: count_codes(codes, BIG_CODES)}
            rec = write_store_shard(w.data, w.plan.store_id, i, {BIG_SITE: codes}, tok, counts)
            w.commit([rec])
        w.finish()
    finally:
        w.close()
    return path


def _vm(pid: int, key: str) -> float:
    """``VmHWM`` / ``VmRSS`` of process ``pid`` in GiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def run_big(args: argparse.Namespace) -> int:
    """Build (or reuse) the large store, serve it, time code pages and searches, report RSS."""
    d = Path(args.dir or tempfile.mkdtemp(prefix="bench-browse-big-")) / f"store-{args.positions}"
    t0 = time.perf_counter()
    if not (d / "store.json").exists():
        write_big_store(d, args.positions)
    size = sum(f.stat().st_size for f in d.rglob("*") if f.is_file()) / 2**30
    print(f"store {d}: {args.positions:,} positions, {size:.2f} GiB on disk, "
          f"ready in {time.perf_counter() - t0:.1f} s; {load_line()}")  # fmt: skip
    port = _free_port()
    proc, started = _start(d, port)
    rng = random.Random(0)
    c = Client(f"http://127.0.0.1:{port}")
    try:
        print(f"server ready in {started:.1f} s, RSS {_vm(proc.pid, 'VmRSS'):.2f} GiB")
        # the store's vocabulary is the token ids' decimal strings (no tokenizer with it), so a
        # regex runs over runs of digits; token searches name ids
        queries = [("regex", r"4242"), ("token", "#123"), ("regex", r"(777)1"),
                   ("token", "#7"), ("regex", r"90210")]  # fmt: skip
        for i in range(args.requests):
            code = min(int(rng.expovariate(1 / 200)), BIG_CODES - 1)
            head = rng.randrange(BIG_HEADS)
            c.call("code page", f"/api/code/{urllib.parse.quote(BIG_SITE)}/{head}/{code}")
            kind, text = queries[i % len(queries)]
            q = {"kind": kind, "q": text, "min_count": 5, "limit": 25}
            c.call(f"search ({kind})", "/api/search?" + urllib.parse.urlencode(q))
        hwm = _vm(proc.pid, "VmHWM")
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    rows, ok = [], not c.errors and hwm <= 2.0
    for name, xs in c.times.items():
        p95 = _pct(xs, 0.95)
        ok &= p95 <= BIG_TARGETS[name]
        rows.append((name, len(xs), f"{1000 * statistics.median(xs):.0f}", f"{1000 * p95:.0f}",
                     f"{1000 * BIG_TARGETS[name]:.0f}"))  # fmt: skip
    print_table(["endpoint", "n", "p50 ms", "p95 ms", "target p95 ms"], rows)
    print(f"server peak RSS (VmHWM) {hwm:.2f} GiB (target 2.00); {load_line()}")
    print(f"errors: {len(c.errors)}" + "".join(f"\n  {e}" for e in c.errors[:5]))
    if not args.keep:
        shutil.rmtree(d if args.dir else d.parent)
    print("targets met" if ok else "TARGETS MISSED")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print the tables; exit 1 if a target is missed or a request failed."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-seq", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--requests", type=int, default=40, help="sequential requests per endpoint")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--dir", default=None, help="reuse / keep the DIR here")
    ap.add_argument(
        "--positions",
        type=int,
        default=0,
        help="the large-store mode: this many positions at one per-head site",
    )
    ap.add_argument("--keep", action="store_true", help="keep the large store (--positions)")
    args = ap.parse_args(argv)
    if args.positions:
        return run_big(args)
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
