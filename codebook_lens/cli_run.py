"""The run commands of ``codebook-lens``: ``train``, ``evaluate`` and ``collect`` over a run
directory (:mod:`codebook_lens.pipeline`).

codebook-lens train [CONFIG] --out RUN [flags]   CONFIG: a .toml/.yaml/.json RunConfig file
codebook-lens train --resume --out RUN           continue an interrupted run
codebook-lens evaluate RUN [--eval-tokens N]
codebook-lens collect RUN [--tokens N]

Every field of ``RunConfig`` is also a flag (``--model.name``, ``--data.path``,
``--train.steps``, ...), applied on top of the file; ``--site PATTERN`` (repeatable) with
``--n-codes``/``--k`` replaces the file's site groups.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from codebook_lens.cli_args import CONFIG_FIELDS, NONE_GIVEN, add_config_arguments
from codebook_lens.pipeline.config import RunConfig, load_config_file
from codebook_lens.pipeline.models import ModelConfig
from codebook_lens.pipeline.rundir import RunDir
from codebook_lens.pipeline.sites import SiteGroup
from codebook_lens.pipeline.sources import DataConfig
from codebook_lens.text_table import format_table

__all__ = ["clear_errors", "add_run_parsers", "run_config_from_args"]


def _template() -> RunConfig:
    """A RunConfig whose values are the flags' shown defaults (model and data are required)."""
    return RunConfig(model=ModelConfig(name="MODEL"), data=DataConfig(path="DATASET"))


def _set_path(d: dict[str, Any], path: str, value: Any) -> None:
    head, _, rest = path.partition(".")
    if rest:
        sub = d.get(head)
        d[head] = sub = dict(sub) if isinstance(sub, dict) else {}
        _set_path(sub, rest, value)
    else:
        d[head] = value


def _starting_dict(args: argparse.Namespace) -> dict[str, Any]:
    """The config before flags: the file, or the saved run when resuming without a file."""
    if args.config is not None:
        return load_config_file(args.config)
    run = RunDir(Path(args.out)) if args.out else None
    if args.resume and run is not None and run.run_file.exists():
        return run.config_dict()
    return {}


def run_config_from_args(args: argparse.Namespace) -> RunConfig:
    """The RunConfig of a ``train`` command line: file (or saved run), then flags."""
    d = _starting_dict(args)
    for path in getattr(args, CONFIG_FIELDS, ()):
        value = getattr(args, path, None)
        if value is not None:
            _set_path(d, path, None if value is NONE_GIVEN else value)
    if args.site:
        d["sites"] = [SiteGroup(p, n_codes=args.n_codes, k=args.k).to_dict() for p in args.site]
    if args.out:
        d["out"] = args.out
    for need, flag in (("model", "--model.name"), ("data", "--data.path")):
        if need not in d:
            raise SystemExit(f"codebook-lens train: no {need} given; pass a config file or {flag}")
    if not d.get("sites"):
        raise SystemExit(
            "codebook-lens train: no sites; add [[sites]] to the config file or pass --site "
            "'blocks.*.attn.hook_z' (with --n-codes and --k)"
        )
    try:
        return RunConfig.from_dict(d)
    except (TypeError, ValueError) as e:
        where = f"{args.config}: " if args.config is not None else ""
        raise type(e)(f"{where}{e}") from None


def _accelerator() -> Any:
    """An accelerator when launched by ``accelerate launch`` (several processes), else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from codebook_lens.training import make_accelerator

        return make_accelerator()
    return None


def _end_processes(acc: Any) -> None:
    """Exit this process now if it is one of several (see ``exit_processes``)."""
    if acc is not None:
        from codebook_lens.training import exit_processes

        exit_processes(acc)


def _cmd_train(args: argparse.Namespace) -> int:
    from codebook_lens.pipeline.train import train_run

    cfg = run_config_from_args(args)
    acc = _accelerator()
    trained = train_run(cfg, resume=args.resume, accelerator=acc)
    if _is_main():
        print(format_table(trained.evaluation.rows(), trained.evaluation.header()))
        print(f"\nwrote {trained.dir.path} (model/, evaluation.json, report.html)")
    _end_processes(acc)
    return 0


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from codebook_lens.pipeline.evaluate import evaluate_run

    ev = evaluate_run(args.run, eval_tokens=args.eval_tokens, progress=not args.no_progress)
    print(format_table(ev.rows(), ev.header()))
    print(f"\nwrote {Path(args.run) / 'evaluation.json'}")
    return 0


def _cmd_collect(args: argparse.Namespace) -> int:
    from codebook_lens.pipeline.collect import collect_run

    acc = _accelerator()
    store = collect_run(
        args.run,
        tokens=args.tokens,
        resume=not args.restart,
        accelerator=acc,
        progress=not args.no_progress,
    )
    if acc is None or _is_main():
        rows = [(s, str(store.n_heads(s)), str(store.k(s))) for s in store.sites]
        print(format_table(rows, ("site", "heads", "k")))
        print(f"\n{store.n_tokens:,} tokens in {Path(args.run) / 'store'}")
    _end_processes(acc)
    return 0


_USER_ERRORS = (ValueError, TypeError, KeyError, FileNotFoundError)


def clear_errors(command: Any) -> Any:
    """``command`` with a user's mistake (a bad config, path, pattern or dataset) reported as
    one line naming the fix instead of a traceback; ``CODEBOOK_LENS_TRACEBACK=1`` keeps it."""

    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except _USER_ERRORS as e:
            if os.environ.get("CODEBOOK_LENS_TRACEBACK"):
                raise
            msg = e.args[0] if isinstance(e, KeyError) and e.args else e
            raise SystemExit(f"codebook-lens {args.command}: error: {msg}") from None

    return run


def _train_parser(sub: Any) -> None:
    t = sub.add_parser(
        "train",
        help="train codebooks on a Hugging Face model and dataset into a run directory",
        usage="%(prog)s [CONFIG] --out RUN [--resume] [flags]",
        description=__doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    t.add_argument("config", nargs="?", help="a RunConfig file (.toml, .yaml, .yml, .json)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out")
    t.add_argument("--site", action="append", help="a site pattern (repeatable)")
    t.add_argument("--n-codes", type=int, default=10_000, help="codes per --site codebook")
    t.add_argument("--k", type=int, default=8, help="active codes per position for --site")
    add_config_arguments(t, _template(), exclude=["sites"])
    t.set_defaults(func=clear_errors(_cmd_train))


def add_run_parsers(sub: Any) -> None:
    """Add ``train``, ``evaluate`` and ``collect`` to the ``codebook-lens`` subcommands."""
    _train_parser(sub)
    ev = sub.add_parser("evaluate", help="loss recovered, explained variance, usage of RUN")
    ev.add_argument("run", help="a run directory written by `codebook-lens train`")
    ev.add_argument("--eval-tokens", type=int, default=None, help="held-out tokens to use")
    ev.add_argument("--no-progress", action="store_true", help="hide progress bars")
    ev.set_defaults(func=clear_errors(_cmd_evaluate))
    co = sub.add_parser("collect", help="write the codes of RUN's sites to RUN/store")
    co.add_argument("run", help="a run directory written by `codebook-lens train`")
    co.add_argument("--tokens", type=int, default=None, help="tokens to collect")
    co.add_argument("--restart", action="store_true", help="discard a partial store")
    co.add_argument("--no-progress", action="store_true", help="hide progress bars")
    co.set_defaults(func=clear_errors(_cmd_collect))
