"""Codebook quantizer speed and memory against the bare GEMM floor, in one process.

    python benchmarks/bench_quantizer.py                # table of medians of 7 alternated runs
    python benchmarks/bench_quantizer.py --repeats 5 --shapes a b --parts

For each shape the cases run in turn, round after round, and ratios are medians of the
per-round ratios to the GEMM floor ``torch.bmm(x_g, codebook^T)`` of the same inputs (which
allocates its score matrix, as any unchunked quantizer must). ``bmm(out=)`` writes into a
preallocated matrix instead: the compute floor. Peak memory runs in a fresh interpreter per
case and reads the kernel's resident-set high-water mark (VmHWM), so it counts every byte
torch, MKL and the allocator touched.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from codebook_lens import Codebook, CodebookConfig, topk_codes

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import (  # noqa: E402
    alternate,
    load_line,
    median,
    paired_ratio,
    peak_rss_mb,
    print_table,
    reset_peak_rss,
    rss_mb,
    run_child,
)

__all__ = ["Shape", "SHAPES", "main"]


@dataclass(frozen=True)
class Shape:
    name: str
    tokens: int
    groups: int
    d: int
    codes: int
    k: int

    def __str__(self) -> str:
        heads = f"{self.groups}x" if self.groups > 1 else ""
        return f"{self.tokens} tok, {heads}d={self.d}, N={self.codes}, k={self.k}"


SHAPES = {
    "a": Shape("a", 8192, 1, 128, 10_000, 8),
    "b": Shape("b", 8192, 4, 32, 10_000, 1),
    "c": Shape("c", 65536, 16, 64, 10_000, 1),
}


def _make(s: Shape, seed: int = 0) -> tuple[Codebook, torch.Tensor]:
    cb = Codebook(CodebookConfig(d_in=s.d, n_codes=s.codes, k=s.k, n_groups=s.groups, seed=seed))
    x = torch.randn(s.tokens, s.groups, s.d, generator=torch.Generator().manual_seed(seed + 1))
    return cb, (x if s.groups > 1 else x[:, 0].contiguous())


def _vq(s: Shape):
    from vector_quantize_pytorch import VectorQuantize

    return VectorQuantize(
        dim=s.groups * s.d,
        codebook_size=s.codes,
        codebook_dim=s.d,
        heads=s.groups,
        separate_codebook_per_head=s.groups > 1,
        use_cosine_sim=True,
    )


def _cases(s: Shape, with_vq: bool, parts: bool) -> dict:
    cb, x = _make(s)
    xg = x.reshape(s.tokens, s.groups, s.d).transpose(0, 1)  # [G, T, d], a view
    w_t = cb.codebook.detach().transpose(1, 2)  # [G, d, N], a view
    scores = torch.empty(s.groups, s.tokens, s.codes)
    xr = x.detach().clone().requires_grad_(True)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))

    def eval_fwd():
        cb.eval()
        with torch.no_grad():
            return cb(x)

    def train_step():
        cb.train()
        xr.grad = cb.codebook.grad = None
        y = cb(xr)
        torch.autograd.backward([y, cb.aux_loss()], [g, None])

    cases = {
        "GEMM floor: bmm": lambda: torch.bmm(xg, w_t),
        "bmm(out=) preallocated": lambda: torch.bmm(xg, w_t, out=scores),
        "codebook eval forward": eval_fwd,
        "codebook train fwd+bwd": train_step,
    }
    if parts:
        flat = x.reshape(-1, s.groups, s.d)
        codes = topk_codes(flat, cb.codebook.detach(), s.k)
        cases["  part: topk_codes"] = lambda: topk_codes(flat, cb.codebook.detach(), s.k)
        g_codes = g.view(*codes.shape[:-1], s.d)

        def decode_step():
            cb.codebook.grad = None
            cb.decode(codes).backward(g_codes)

        cases["  part: decode fwd+bwd"] = decode_step
        cases["  part: full scores + topk"] = lambda: torch.bmm(xg, F.normalize(w_t, dim=1)).topk(
            s.k, dim=-1
        )
    if with_vq and s.k == 1:
        vq = _vq(s)
        x3 = x.reshape(1, s.tokens, s.groups * s.d)
        x3r = x3.detach().clone().requires_grad_(True)
        g3 = g.reshape(x3.shape)

        def vq_eval():
            vq.eval()
            with torch.no_grad():
                return vq(x3)

        def vq_train():
            vq.train()
            x3r.grad = None
            y, _, loss = vq(x3r)
            torch.autograd.backward([y, loss], [g3, None])

        cases["vector-quantize-pytorch eval"] = vq_eval
        cases["vector-quantize-pytorch train"] = vq_train
    return cases


def _peak_child(shape: str, mode: str) -> None:
    """Child process: extra resident memory of one call beyond inputs and outputs."""
    s = SHAPES[shape]
    cb, x = _make(s)
    small = x[:256].clone()
    cb.train(mode == "train")
    if mode == "train":
        cb(small.requires_grad_(True)).sum().backward()  # load kernels, build autograd once
        x.requires_grad_(True)
    else:
        with torch.no_grad():
            cb(small)
    cb.codebook.grad = None
    base = rss_mb()
    reset_peak_rss()
    t0 = time.perf_counter()
    if mode == "train":
        y = cb(x)
        torch.autograd.backward([y, cb.aux_loss()], [torch.ones_like(y), None])
    else:
        with torch.no_grad():
            y = cb(x)
    secs = time.perf_counter() - t0
    mib = 2**20
    out_mb = y.numel() * y.element_size() / mib
    # train also keeps x.grad and codebook.grad (same size as x and the codebook) and the
    # all-ones upstream gradient (same size as y)
    kept = out_mb + (2 * out_mb + cb.codebook.numel() * 4 / mib if mode == "train" else 0.0)
    print(json.dumps({"peak_mb": peak_rss_mb() - base, "kept_mb": kept, "secs": secs}))


def _fmt_ms(ts: list[float]) -> str:
    return f"{median(ts) * 1e3:.1f}"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7, help="alternated rounds (>= 5)")
    ap.add_argument("--shapes", nargs="+", default=["a", "b", "c"], choices=sorted(SHAPES))
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--no-vq", action="store_true", help="skip vector-quantize-pytorch")
    ap.add_argument("--parts", action="store_true", help="also time the quantizer's parts")
    ap.add_argument("--peak-child", nargs=2, metavar=("SHAPE", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.peak_child:
        _peak_child(*args.peak_child)
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {load_line()}")
    print(f"medians of {args.repeats} alternated rounds; ratios are per-round medians\n")
    rows = []
    for key in [k for k in args.shapes if k != "c"]:
        s = SHAPES[key]
        times = alternate(_cases(s, not args.no_vq, args.parts), args.repeats)
        floor, pre = times["GEMM floor: bmm"], times["bmm(out=) preallocated"]
        for name, ts in times.items():
            rows.append(
                [f"{key}: {s}", name, _fmt_ms(ts), f"{paired_ratio(ts, floor):.2f}x",
                 f"{paired_ratio(ts, pre):.2f}x"]
            )  # fmt: skip
    if rows:
        print_table(["shape", "case", "median ms", "vs bmm floor", "vs bmm(out=)"], rows)
    if "c" in args.shapes:
        s = SHAPES["c"]
        script = os.path.abspath(__file__)
        flag = ["--threads", str(args.threads), "--peak-child", "c"]
        x_mb = s.tokens * s.groups * s.d * 4 / 2**20
        print(f"\nc: {s}: input {x_mb:.0f} MiB; a full score matrix would need "
              f"{s.tokens * s.groups * s.codes * 4 / 2**30:.1f} GiB")  # fmt: skip
        mem_rows = []
        for mode in ("eval", "train"):
            r = run_child(script, [*flag, mode])
            extra = (r["peak_mb"] - r["kept_mb"]) / 1024
            mem_rows.append([f"codebook {mode}", f"{r['secs']:.1f}", f"{extra:.2f}"])
        print_table(["case", "seconds (1 run)", "extra peak GiB"], mem_rows)


if __name__ == "__main__":
    main()
