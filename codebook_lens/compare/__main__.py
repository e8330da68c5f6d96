"""``python -m codebook_lens.compare --out DIR [--task tokfsm lm] [--small] [--seeds 0 1 2]``:
codes versus SAEs on TokFSM and on the topic-stories LM (transformer-lens 3.x with SAELens;
``make compare-saes``). Writes ``DIR/tokfsm/`` (``results.json``, ``table.md``,
``best_features.png``, ``saes/``) and ``DIR/lm/`` (``results.json``, ``table.md``,
``topics.md``, ``topics.png``, ``saes/``)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from codebook_lens.atomic import write_text
from codebook_lens.compare.fsm_run import FSMCompareConfig, compare_fsm
from codebook_lens.compare.lm_run import LMCompareConfig, compare_lm
from codebook_lens.compare.report import (
    best_feature_figure,
    fsm_table,
    lm_table,
    lm_topic_table,
    topic_figure,
)

__all__ = ["main"]


def _tokfsm(args: argparse.Namespace, changes: dict) -> str:
    base = FSMCompareConfig.small() if args.small else FSMCompareConfig()
    cfg = dataclasses.replace(base, **changes)
    out = args.out / "tokfsm"
    result = compare_fsm(cfg, out, args.cache_dir)
    table = fsm_table(result)
    write_text(out / "table.md", table)
    best_feature_figure(result).savefig(out / "best_features.png", dpi=120)
    return f"{table}\nwrote {out} in {result['seconds']:.0f} s"


def _lm(args: argparse.Namespace, changes: dict) -> str:
    base = LMCompareConfig.small() if args.small else LMCompareConfig()
    cfg = dataclasses.replace(base, **changes)
    out = args.out / "lm"
    result = compare_lm(cfg, out, args.cache_dir)
    table, topics = lm_table(result), lm_topic_table(result)
    write_text(out / "table.md", table)
    write_text(out / "topics.md", topics)
    topic_figure(result).savefig(out / "topics.png", dpi=120)
    return f"{table}\n{topics}\nwrote {out} in {result['seconds']:.0f} s"


def main(argv: list[str] | None = None) -> int:
    """Run the comparisons and write their results, tables and figures."""
    p = argparse.ArgumentParser(prog="python -m codebook_lens.compare", description=__doc__)
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--task", nargs="+", choices=["tokfsm", "lm"], default=["tokfsm", "lm"],
                   help="which comparisons to run (default both)")  # fmt: skip
    p.add_argument("--cache-dir", type=Path, default=Path(".cache"),
                   help="where the demos' base models and codebooks are cached")  # fmt: skip
    p.add_argument("--small", action="store_true", help="the minutes-long small versions")
    p.add_argument("--seeds", type=int, nargs="+", help="dictionary seeds (default 0 1 2)")
    p.add_argument("--train-tokens", type=int, help="training tokens of every dictionary")
    args = p.parse_args(argv)
    changes = {"seeds": args.seeds, "train_tokens": args.train_tokens}
    changes = {k: v for k, v in changes.items() if v is not None}
    for task in dict.fromkeys(args.task):
        print((_tokfsm if task == "tokfsm" else _lm)(args, changes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
