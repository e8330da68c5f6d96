"""Cost of the non-finite step in ``Codebook.encode`` and of low-precision activations, in one
process (cases alternated, medians of per-round ratios).

    python benchmarks/bench_finite_dtype.py [--repeats 15] [--k 1 8]

TokFSM-size site: 32 x 129 positions, d_in=128, n_codes=1000. ``encode`` always marks NaN/inf
rows empty (one fp32 row sum and a masked fill, no host sync); ``check_finite=True`` adds one
reduction and a host sync. Low-precision rows: activations in bf16/fp16 with the default
float32 codebook parameters (cast at use) or with bf16 parameters (``cm.to(torch.bfloat16)``).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import alternate, load_line, median, paired_ratio, print_table  # noqa: E402

from codebook_lens import Codebook, CodebookConfig, topk_codes  # noqa: E402

__all__ = ["cases", "main"]


def cases(x: torch.Tensor, k: int) -> dict[str, Callable[[], object]]:
    """The timed calls for one k (``topk_codes`` first: the baseline of the ratios)."""
    cfg = CodebookConfig(d_in=128, n_codes=1000, k=k)
    cb, cb16 = Codebook(cfg).eval(), Codebook(cfg).eval().to(torch.bfloat16)
    flat, xb, xh = x.reshape(-1, 1, 128), x.bfloat16(), x.half()
    return {
        "topk_codes (no finite step)": lambda: topk_codes(flat, cb.codebook, k),
        "encode (NaN rows -> -1)": lambda: cb.encode(x),
        "encode check_finite=True": lambda: cb.encode(x, check_finite=True),
        "forward fp32": lambda: cb(x),
        "forward bf16, fp32 params": lambda: cb(xb),
        "forward bf16, bf16 params": lambda: cb16(xb),
        "forward fp16, fp32 params": lambda: cb(xh),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--k", type=int, nargs="+", default=[1, 8])
    args = ap.parse_args()
    torch.manual_seed(0)
    x = torch.randn(32, 129, 128)
    rows = []
    for k in args.k:
        with torch.no_grad():
            t = alternate(cases(x, k), args.repeats)
        base = t["topk_codes (no finite step)"]
        for name, ts in t.items():
            rows.append([k, name, f"{median(ts) * 1e3:.2f}", f"{paired_ratio(ts, base):.3f}"])
    print(load_line())
    print_table(["k", "case", "ms (median)", "ratio to topk_codes"], rows)


if __name__ == "__main__":
    main()
