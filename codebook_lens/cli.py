"""The ``codebook-lens`` command.

codebook-lens train [CONFIG] --out RUN       codebooks on a Hugging Face model and dataset
codebook-lens evaluate RUN                   loss recovered, explained variance, code usage
codebook-lens collect RUN [--tokens N]       codes of many tokens -> RUN/store (on disk)
codebook-lens browse RUN                     the code browser over a run (or a demo's DIR)
codebook-lens export neuronpedia RUN --out DIR  Neuronpedia bulk-import files of a collected run
codebook-lens export dashboard RUN --out DIR    offline feature dashboards (one HTML page a site)
codebook-lens demo --out DIR                 TokFSM end to end (cached base model reused)
codebook-lens fsm train-base --out DIR       step 1: FSM + base model
codebook-lens fsm train-codebooks --base DIR --out DIR
codebook-lens fsm analyze --model DIR --out DIR
codebook-lens report DIR                     rebuild DIR/report.html from DIR/metrics.json
codebook-lens lm-demo --out DIR              language-model path (topic codes, steering)
codebook-lens browse DIR [--port N]          the code browser (a local web server) over DIR
codebook-lens convert SRC OUT [--base BASE]  a codebook-features checkpoint -> our format

The run commands take one flag per field of their config dataclass (``ExperimentConfig``,
``LMDemoConfig``; nested ones as ``--train.steps``, ``--plan.placement``), with the field's
docstring as help: see ``codebook-lens COMMAND --help``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import warnings
from pathlib import Path
from typing import Any

from torch import nn

from codebook_lens.atomic import write_text
from codebook_lens.backends import BACKENDS, BackendError
from codebook_lens.cli_args import add_config_arguments, config_from_args
from codebook_lens.cli_run import add_run_parsers, clear_errors
from codebook_lens.fsm.experiment import (
    ExperimentConfig,
    attach_codebooks,
    finetune_codebooks,
    get_base_model,
    init_codebooks,
    interventions,
    state_recovery,
    transition_accuracy_of,
)
from codebook_lens.fsm.machine import FSM
from codebook_lens.lm.demo import LMDemoConfig
from codebook_lens.model import CodebookModel
from codebook_lens.text_table import format_table

__all__ = ["main", "build_parser", "SHORT_FLAGS"]


SHORT_FLAGS = {
    "train.steps": ["--steps"],
    "plan.placement": ["--placement"],
    "plan.mlp_merge_threshold": ["--merge-threshold"],
}
"""The TokFSM commands' short spellings of some config flags (``--steps`` is
``--train.steps``)."""


def _experiment_config(args: argparse.Namespace) -> ExperimentConfig:
    """The demo's config: ``--small`` or the defaults, then the config flags given."""
    cfg = config_from_args(ExperimentConfig.small() if args.small else ExperimentConfig(), args)
    if args.no_progress:
        cfg.train = dataclasses.replace(cfg.train, progress=False)
    return cfg


def _cmd_demo(args: argparse.Namespace) -> int:
    from codebook_lens.fsm.demo import run_demo, summary_rows

    cfg = _experiment_config(args)
    metrics = run_demo(
        args.out,
        cfg,
        cache_dir=args.cache_dir,
        progress=not args.no_progress,
        log=lambda m: print(m, file=sys.stderr),
    )
    print(format_table(summary_rows(metrics), ("metric", "value", "goal")))
    print(f"\nwrote {Path(args.out) / 'report.html'}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from codebook_lens.fsm.report import rebuild

    path = rebuild(args.dir)
    print(f"wrote {path}")
    return 0


def _cmd_fsm_train_base(args: argparse.Namespace) -> int:
    cfg = _experiment_config(args)
    out = Path(args.out)
    fsm = FSM(cfg.n_states, cfg.n_edges, seed=cfg.fsm_seed)
    fsm.save(out / "fsm.json")
    model, info = get_base_model(fsm, cfg, args.cache_dir, progress=not args.no_progress)
    CodebookModel(model).save(out / "base", include_model=True)
    acc, _ = transition_accuracy_of(model, fsm, cfg)
    write_text(out / "experiment.json", json.dumps(cfg.to_dict(), indent=2))
    print(
        format_table(
            [("base transition accuracy", f"{acc:.3f}"), ("cached", str(info["cached"]))],
            ("metric", "value"),
        )
    )
    return 0


def _load_step(path: Path) -> tuple[ExperimentConfig, FSM]:
    """The settings and FSM a ``train-base`` (or ``train-codebooks``) step saved in ``path``."""
    d = json.loads((path / "experiment.json").read_text())
    return ExperimentConfig.from_dict(d), FSM.load(path / "fsm.json")


def _cmd_fsm_train_codebooks(args: argparse.Namespace) -> int:
    base_dir, out = Path(args.base), Path(args.out)
    cfg, fsm = _load_step(base_dir)
    cfg = config_from_args(cfg, args)
    cfg.backend = args.backend
    base = CodebookModel.load(base_dir / "base", backend=args.backend).detach()
    cm = attach_codebooks(base, cfg.plan, seed=cfg.seed)
    init_codebooks(cm, fsm, cfg)
    at_attach, _ = transition_accuracy_of(cm, fsm, cfg)
    result = finetune_codebooks(cm, fsm, cfg)
    acc, _ = transition_accuracy_of(cm, fsm, cfg)
    cm.save(out / "model", include_model=True)
    fsm.save(out / "fsm.json")
    write_text(out / "experiment.json", json.dumps(cfg.to_dict(), indent=2))
    write_text(out / "history.json", json.dumps(result.history))
    print(
        format_table(
            [
                ("transition accuracy at attach", f"{at_attach:.3f}"),
                ("transition accuracy", f"{acc:.3f}"),
                ("train seconds", f"{result.seconds:.0f}"),
            ],
            ("metric", "value"),
        )
    )
    return 0


def _converted_step(
    path: Path, backend: str
) -> tuple[ExperimentConfig, FSM, CodebookModel, nn.Module]:
    """A ``codebook-lens convert`` output of a TokFSM model (with its ``fsm.json``): the
    experiment settings sized to the model's context, the FSM, the model and its base."""
    if not (path / "fsm.json").exists():
        raise SystemExit(
            f"codebook-lens fsm analyze: {path} has no fsm.json; convert a TokFSM checkpoint "
            "whose directory holds the reference's fsm.npy"
        )
    fsm = FSM.load(path / "fsm.json")
    cm = CodebookModel.load(path, backend=backend)
    base = CodebookModel.load(path, backend=backend).detach()
    max_states = (cm.cfg.n_ctx - 1) // fsm.n_digits
    cfg = ExperimentConfig(n_states=fsm.n_states, n_edges=fsm.n_edges)
    cfg.recovery_states = min(cfg.recovery_states, max_states - 1)
    cfg.intervention_prompt_states = min(cfg.intervention_prompt_states, max_states - 3)
    return cfg, fsm, cm, base


def _cmd_fsm_analyze(args: argparse.Namespace) -> int:
    if args.converted:
        cfg, fsm, cm, base = _converted_step(Path(args.converted), args.backend)
    else:
        if not (args.model and args.base):
            raise SystemExit("codebook-lens fsm analyze: give --model and --base, or --converted")
        model_dir = Path(args.model)
        cfg, fsm = _load_step(model_dir)
        cm = CodebookModel.load(model_dir / "model", backend=args.backend)
        base = CodebookModel.load(Path(args.base) / "base", backend=args.backend).detach()
    rec = state_recovery(cm, base, fsm, cfg)
    itv = interventions(cm, fsm, cfg)
    out = {"recovery": rec.metrics(), "intervention": itv}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    write_text(Path(args.out) / "analysis.json", json.dumps(out, indent=2))
    rows = [
        ("states recovered", f"{rec.states_recovered} / {rec.states_present}"),
        ("mean best-code precision", f"{rec.mean_best_code_precision:.3f}"),
        ("mean best-neuron precision", f"{rec.mean_best_neuron_precision:.3f}"),
        ("intervention success (all sites)", f"{itv['success_rate']:.3f}"),
    ]
    print(format_table(rows, ("metric", "value")))
    return 0


def _cmd_lm_demo(args: argparse.Namespace) -> int:
    try:
        from codebook_lens.lm import run_lm_demo
    except ImportError as e:  # pragma: no cover - depends on optional extras
        raise SystemExit(f"lm-demo needs the language-model extras: {e}") from e
    cfg = config_from_args(LMDemoConfig.small() if args.small else LMDemoConfig(), args)
    if args.no_progress:
        cfg = dataclasses.replace(cfg, progress=False)
    metrics = run_lm_demo(Path(args.out), config=cfg)
    rows = [
        (k, f"{v:.4g}" if isinstance(v, float) else str(v))
        for k, v in metrics.get("summary", {}).items()
    ]
    print(format_table(rows, ("metric", "value")))
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from codebook_lens.convert import convert_checkpoint
    from codebook_lens.fsm.reference import save_reference_fsm
    from codebook_lens.io import CheckpointError

    backend = "bridge" if args.backend == "auto" else args.backend
    try:
        cm = convert_checkpoint(
            args.src, args.out, args.base, backend=backend, revision=args.revision
        )
        save_reference_fsm(args.src, args.out, args.revision)  # a TokFSM checkpoint's machine
    except (CheckpointError, ValueError) as e:
        raise SystemExit(f"codebook-lens convert: {e}") from e
    rows = [
        (site, str(cb.cfg.n_groups), str(cb.cfg.n_codes), str(cb.cfg.k), cb.cfg.similarity)
        for site, cb in cm.codebooks.items()
    ]
    print(format_table(rows, ("site", "groups", "codes", "k", "similarity")))
    print(f"wrote {args.out} (load it with CodebookModel.load)")
    return 0


def _cmd_browse(args: argparse.Namespace) -> int:
    from codebook_lens.browse import serve

    serve(args.dir, args.store, args.model, args.host, args.port)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    """``export neuronpedia``: a collected run's codes as Neuronpedia import files; a user's
    mistake (no store, an unknown site, a bad name) is one line naming the fix."""
    from codebook_lens.analysis import CodeStore
    from codebook_lens.export import NeuronpediaConfig, export_neuronpedia
    from codebook_lens.pipeline.load import load_run

    run = load_run(args.run, device=args.device)
    if not run.dir.store.is_dir():
        raise FileNotFoundError(
            f"{args.run} has no code store; run `codebook-lens collect {args.run}` first"
        )
    done = export_neuronpedia(
        run.cm, CodeStore.open(run.dir.store), args.out,
        config_from_args(NeuronpediaConfig(), args), sites=args.site,
        model_name=run.cfg.model.name, dataset=run.cfg.data.path,
        overwrite=args.overwrite, progress=not args.no_progress,
    )  # fmt: skip
    rows = [(s.site, s.source_id, str(s.n_features), str(s.n_activations)) for s in done.sources]
    print(format_table(rows, ("site", "source", "features", "activations")))
    print(
        f"\nwrote {done.out / done.model_id} (import each source with Neuronpedia's admin import)"
    )
    return 0


def _cmd_export_dashboard(args: argparse.Namespace) -> int:
    """``export dashboard``: one offline feature-dashboard page per site of a collected run."""
    from codebook_lens.analysis import CodeStore
    from codebook_lens.export import DashboardConfig, export_dashboard
    from codebook_lens.pipeline.load import load_run

    run = load_run(args.run, device=args.device)
    if not run.dir.store.is_dir():
        raise FileNotFoundError(
            f"{args.run} has no code store; run `codebook-lens collect {args.run}` first"
        )
    cfg = config_from_args(DashboardConfig(), args)
    if args.codes is not None:
        cfg.codes = None if args.codes == "all" else args.codes
    done = export_dashboard(
        run.cm, CodeStore.open(run.dir.store), args.out, cfg, sites=args.site,
        model_name=run.cfg.model.name, overwrite=args.overwrite, progress=not args.no_progress,
    )  # fmt: skip
    rows = [(s, str(done.n_features[s]), str(p)) for s, p in done.pages.items()]
    print(format_table(rows, ("site", "codes", "page")))
    print(f"\nopen {done.index} in a browser (works offline)")
    return 0


def _codes_arg(text: str) -> int | str:
    if text == "all":
        return text
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number of codes >= 1, or 'all'")
    return n


def _dashboard_parser(fmt: Any) -> None:
    """``export dashboard RUN --out DIR`` with a flag per DashboardConfig field."""
    from codebook_lens.export import DashboardConfig

    db = fmt.add_parser(
        "dashboard",
        help="offline feature dashboards: one self-contained HTML page per site "
        "(docs/dashboards.md)",
        usage="%(prog)s RUN --out DIR [--site SITE ...] [--codes N|all] [options]",
    )
    db.add_argument("run", help="a run directory after `codebook-lens collect`")
    db.add_argument("--out", required=True, help="output directory (created if missing)")
    db.add_argument("--site", action="append", help="a site to export (repeatable; default all)")
    db.add_argument(
        "--codes", type=_codes_arg, default=None,
        help="the N most used codes per site and head (default 50), or 'all' (dead ones too)",
    )  # fmt: skip
    db.add_argument("--overwrite", action="store_true", help="replace an earlier dashboard")
    db.add_argument("--device", default=None, help="device for the model (default: the run's)")
    db.add_argument("--no-progress", action="store_true", help="hide progress bars")
    add_config_arguments(db, DashboardConfig(), exclude=["codes"])
    db.set_defaults(func=clear_errors(_cmd_export_dashboard))


def _export_parsers(sub: Any) -> None:
    """``export neuronpedia|dashboard RUN --out DIR`` with a flag per config field."""
    from codebook_lens.export import NeuronpediaConfig

    ex = sub.add_parser(
        "export", help="export a collected run to other tools (Neuronpedia, dashboards)"
    )
    fmt = ex.add_subparsers(dest="format", required=True)
    npd = fmt.add_parser(
        "neuronpedia",
        help="Neuronpedia bulk-import files: one source per site (docs/neuronpedia.md)",
        usage="%(prog)s RUN --out DIR [--site SITE ...] [options]",
    )
    npd.add_argument("run", help="a run directory after `codebook-lens collect`")
    npd.add_argument("--out", required=True, help="output directory (new, empty, or --overwrite)")
    npd.add_argument("--site", action="append", help="a site to export (repeatable; default all)")
    npd.add_argument("--overwrite", action="store_true", help="replace an earlier export at --out")
    npd.add_argument("--device", default=None, help="device for the model (default: the run's)")
    npd.add_argument("--no-progress", action="store_true", help="hide progress bars")
    add_config_arguments(npd, NeuronpediaConfig())
    npd.set_defaults(func=clear_errors(_cmd_export))
    _dashboard_parser(fmt)


def _backend_flag(sp: argparse.ArgumentParser) -> None:
    sp.add_argument(
        "--backend",
        choices=BACKENDS,
        default="auto",
        help="TransformerLens model class: hooked (HookedTransformer, transformer-lens 3.x), "
        "bridge (TransformerBridge) or auto (hooked where it exists, else bridge)",
    )


def _run_flags(sp: argparse.ArgumentParser, small: str, cache: bool = True) -> None:
    sp.add_argument("--out", required=True, help="output directory")
    sp.add_argument("--small", action="store_true", help=small)
    if cache:
        sp.add_argument("--cache-dir", default=None, help="base-model cache directory")
    sp.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _fsm_parsers(sub: Any) -> None:
    """``demo``, ``report`` and the ``fsm`` steps; their config flags are ExperimentConfig's."""
    cfg, small = ExperimentConfig(), "tiny sizes (seconds; for tests); flags apply on top"
    usage = "%(prog)s --out DIR [--small] [options]"
    d = sub.add_parser("demo", help="TokFSM end to end, writing DIR/report.html", usage=usage)
    _run_flags(d, small)
    add_config_arguments(d, cfg, aliases=SHORT_FLAGS, exclude=["train.progress"])
    d.set_defaults(func=_cmd_demo)
    r = sub.add_parser("report", help="rebuild DIR/report.html from DIR/metrics.json")
    r.add_argument("dir")
    r.set_defaults(func=_cmd_report)

    fsub = sub.add_parser("fsm", help="TokFSM steps").add_subparsers(dest="step", required=True)
    tb = fsub.add_parser("train-base", help="FSM + base model -> DIR/base", usage=usage)
    _run_flags(tb, small)
    add_config_arguments(tb, cfg, aliases=SHORT_FLAGS, exclude=["train.progress"])
    tb.set_defaults(func=_cmd_fsm_train_base)
    tc = fsub.add_parser(
        "train-codebooks",
        help="attach + finetune codebooks -> DIR/model",
        usage="%(prog)s --base DIR --out DIR [options]",
        description="Config flags change the settings saved by train-base in --base (the "
        "defaults shown are ExperimentConfig's).",
    )
    tc.add_argument("--base", required=True, help="output directory of train-base")
    tc.add_argument("--out", required=True, help="output directory")
    _backend_flag(tc)  # the FSM and base model come from --base: their settings are fixed
    fixed = ["n_states", "n_edges", "fsm_seed", "base", "backend"]
    add_config_arguments(tc, cfg, aliases=SHORT_FLAGS, exclude=fixed)
    tc.set_defaults(func=_cmd_fsm_train_codebooks)
    an = fsub.add_parser("analyze", help="state recovery + interventions -> DIR/analysis.json")
    an.add_argument("--model", help="output directory of train-codebooks")
    an.add_argument("--base", help="output directory of train-base")
    an.add_argument(
        "--converted", help="instead: a `codebook-lens convert` output of a TokFSM model"
    )
    an.add_argument("--out", required=True)
    _backend_flag(an)
    an.set_defaults(func=_cmd_fsm_analyze)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``codebook-lens``; each run command's config flags and their
    help come from its config dataclass (:mod:`codebook_lens.cli_args`)."""
    p = argparse.ArgumentParser(
        prog="codebook-lens",
        description=__doc__.replace("``", "").split("\n", 1)[1].strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)
    add_run_parsers(sub)
    _fsm_parsers(sub)
    lm = sub.add_parser(
        "lm-demo",
        help="language model: topic codes and steering",
        usage="%(prog)s --out DIR [--small] [options]",
    )
    _run_flags(lm, "a one-minute smoke run; flags apply on top", cache=False)
    add_config_arguments(lm, LMDemoConfig(), exclude=["progress"])
    lm.set_defaults(func=_cmd_lm_demo)

    cv = sub.add_parser(
        "convert", help="a codebook-features (reference) checkpoint -> our format, base included"
    )
    cv.add_argument("src", help="the reference's save_pretrained directory, or a Hub repo id")
    cv.add_argument("out", help="output directory (CodebookModel.load(OUT) restores it)")
    cv.add_argument(
        "--base",
        default=None,
        help="base model: directory or Hub id (optional for the paper's released checkpoints)",
    )
    cv.add_argument("--revision", default=None, help="Hub revision of SRC")
    _backend_flag(cv)
    cv.set_defaults(func=_cmd_convert)
    _export_parsers(sub)
    br = sub.add_parser("browse", help="serve the code browser for DIR (prints its URL)")
    from codebook_lens.browse.server import add_arguments  # no web framework imported here

    add_arguments(br)
    br.set_defaults(func=_cmd_browse)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``codebook-lens``."""
    from codebook_lens.io import CheckpointError

    parser = build_parser()
    args = parser.parse_args(argv)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            return int(args.func(args) or 0)
        except (BackendError, CheckpointError) as e:  # a bad backend or file: no traceback
            parser.exit(2, f"codebook-lens: error: {e}\n")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
