"""``python -m codebook_lens.compare --out DIR [--small] [--seeds 0 1 2]``: the codes-versus-SAEs
comparison on TokFSM (transformer-lens 3.x with SAELens; ``make compare-saes``). Writes
``DIR/results.json``, ``DIR/table.md`` and ``DIR/best_features.png``."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from codebook_lens.atomic import write_text
from codebook_lens.compare.report import best_feature_figure, markdown_table
from codebook_lens.compare.run import CompareConfig, compare_fsm

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Run the comparison and write its results, table and figure."""
    p = argparse.ArgumentParser(prog="python -m codebook_lens.compare", description=__doc__)
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--cache-dir", type=Path, default=Path(".cache"),
                   help="where the TokFSM demo's base model and codebooks are cached")  # fmt: skip
    p.add_argument("--small", action="store_true", help="the minutes-long small version")
    p.add_argument("--seeds", type=int, nargs="+", help="dictionary seeds (default 0 1 2)")
    p.add_argument("--train-tokens", type=int, help="training tokens of every dictionary")
    args = p.parse_args(argv)
    cfg = CompareConfig.small() if args.small else CompareConfig()
    changes = {"seeds": args.seeds, "train_tokens": args.train_tokens}
    cfg = dataclasses.replace(cfg, **{k: v for k, v in changes.items() if v is not None})
    result = compare_fsm(cfg, args.out, args.cache_dir)
    table = markdown_table(result)
    write_text(args.out / "table.md", table)
    best_feature_figure(result).savefig(args.out / "best_features.png", dpi=120)
    print(table)
    print(f"wrote {args.out} in {result['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
