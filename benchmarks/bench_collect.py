"""Collecting codes to disk: tokens per second and peak memory against the number of tokens.

    python benchmarks/bench_collect.py                        # 1M and 10M tokens
    python benchmarks/bench_collect.py --tokens 1000000 10000000 --shard-mb 16 --memory

Each run is a fresh child process that builds the TokFSM-size model of ``bench_model.py`` (4
layers, d_model 128, 4 heads, codebooks of 1,000 codes, k=1 at every ``attn.hook_z`` and
``hook_mlp_out``), generates random token batches on the fly (an endless iterator: no dataset in
memory) and runs ``collect_codes(..., out=DIR, max_tokens=N)``. Its peak RSS (``VmHWM`` of
/proc/self/status, reset after the model is built; Linux) is that of the collection. The table
gives tokens per second, the RSS before, the peak RSS and the store size; the last line says
whether the peak grows with N. ``--memory`` adds the same collection kept in memory
(``out=None``), whose peak grows with N, for contrast.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import load_line, peak_rss_mb, print_table, reset_peak_rss, rss_mb  # noqa: E402
from bench_model import build  # noqa: E402

__all__ = ["main"]


def _batches(batch: int, seq: int, d_vocab: int) -> Iterator[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    while True:
        yield torch.randint(0, d_vocab, (batch, seq), generator=g)


def child(n_tokens: int, out: str | None, batch: int, shard_mb: float) -> dict:
    """One collection in this process; its figures as a dict."""
    from codebook_lens.analysis import collect_codes

    _, cm = build("tokfsm", "auto")
    seq = cm.model.cfg.n_ctx - 1
    data = _batches(batch, seq, cm.model.cfg.d_vocab)
    before = rss_mb()
    reset_peak_rss()  # the peak of the collection itself, after imports and the model
    t0 = time.perf_counter()
    store = collect_codes(cm, data, batch_size=batch, progress=False, out=out,
                          max_tokens=n_tokens, shard_mb=shard_mb)  # fmt: skip
    seconds = time.perf_counter() - t0
    return {
        "tokens": store.n_tokens,
        "seconds": seconds,
        "peak_mib": peak_rss_mb(),
        "before_mib": before,
        "store_mib": store.nbytes / 2**20,
        "shards": store.n_shards,
    }


def _run(n: int, disk: bool, args: argparse.Namespace, tmp: Path) -> dict:
    out = tmp / f"store-{n}"
    cmd = [sys.executable, __file__, "--child", str(n), "--batch", str(args.batch),
           "--shard-mb", str(args.shard_mb), "--threads", str(args.threads)]  # fmt: skip
    if disk:
        cmd += ["--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    shutil.rmtree(out, ignore_errors=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1_000_000, 10_000_000])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--shard-mb", type=float, default=16.0)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--memory", action="store_true", help="also collect in memory, for contrast")
    ap.add_argument("--dir", default=None, help="where the stores go (default: a temp dir)")
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child is not None:
        print(json.dumps(child(args.child, args.out, args.batch, args.shard_mb)))
        return
    print(f"torch {torch.__version__}, {args.threads} threads; {load_line()}")
    print(f"TokFSM-size model, batches of {args.batch} x 128 tokens, shards ~{args.shard_mb} MiB")
    rows, peaks = [], {}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for disk in [True] + ([False] if args.memory else []):
            for n in args.tokens:
                r = _run(n, disk, args, Path(tmp))
                peaks[(disk, n)] = r["peak_mib"]
                rows.append([
                    "disk" if disk else "memory", f"{r['tokens']:,}", f"{r['seconds']:.1f}",
                    f"{r['tokens'] / r['seconds']:,.0f}", f"{r['before_mib']:.0f}",
                    f"{r['peak_mib']:.0f}", f"{r['store_mib']:.0f}", str(r["shards"]),
                ])  # fmt: skip
    print_table(["store", "tokens", "seconds", "tokens / s", "RSS before (MiB)",
                 "peak RSS (MiB)", "store (MiB)", "shards"], rows)  # fmt: skip
    lo, hi = min(args.tokens), max(args.tokens)
    grow = peaks[(True, hi)] - peaks[(True, lo)]
    verdict = "no" if grow < max(32.0, 0.05 * peaks[(True, lo)]) else "YES"
    print(
        f"\ndisk: peak RSS at {hi:,} tokens minus at {lo:,}: {grow:+.0f} MiB "
        f"({peaks[(True, hi)] / peaks[(True, lo)]:.2f}x for {hi / lo:.0f}x the tokens); "
        f"grows with N: {verdict}"
    )
    if args.memory:
        g = peaks[(False, hi)] - peaks[(False, lo)]
        print(f"memory: the same difference is {g:+.0f} MiB")


if __name__ == "__main__":
    main()
