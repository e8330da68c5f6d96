"""`run_demo`: the whole TokFSM experiment, writing its artefacts to one directory.

Contents of ``out_dir``: ``fsm.json``, ``samples.json`` (token ids behind the accuracy figures),
``metrics.json``, ``history.json`` (training curves), ``model/`` (a saved CodebookModel with its
base model) and ``report.html``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from codebook_lens.analysis.store import CodeStore
from codebook_lens.atomic import write_text
from codebook_lens.browse.layout import write_browse_data
from codebook_lens.evaluation import evaluate_codebooks
from codebook_lens.fsm.data import eval_set
from codebook_lens.fsm.experiment import (
    ExperimentConfig,
    StateRecovery,
    attach_codebooks,
    clone_model,
    finetune_codebooks,
    get_base_model,
    init_codebooks,
    interventions,
    state_recovery,
    transition_accuracy_of,
)
from codebook_lens.fsm.machine import FSM
from codebook_lens.fsm.report import summary_rows, write_report
from codebook_lens.model import CodebookModel
from codebook_lens.training import TrainResult

__all__ = [
    "run_demo",
    "default_cache_dir",
    "summary_rows",
    "held_out_evaluation",
    "write_fsm_browse_data",
    "EVAL_WALKS",
]


def default_cache_dir() -> Path:
    """Where trained base models are cached: ``$CODEBOOK_LENS_CACHE`` or
    ``~/.cache/codebook_lens``."""
    env = os.environ.get("CODEBOOK_LENS_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "codebook_lens"


def _cpu_ticks() -> tuple[int, int] | None:
    """(steal, total) jiffies of all CPUs from ``/proc/stat`` (None where unavailable)."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    return (fields[7] if len(fields) > 7 else 0), sum(fields[:8])


def _steal_fraction(start: tuple[int, int] | None) -> float | None:
    """Share of CPU time the hypervisor took from this VM since ``start`` (steal time)."""
    end = _cpu_ticks()
    if start is None or end is None or end[1] <= start[1]:
        return None
    return round((end[0] - start[0]) / (end[1] - start[1]), 4)


def _write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2))


class _Clock:
    """Wall time of each stage (``lap``) and of the whole run, plus CPU time and steal."""

    def __init__(self) -> None:
        self.start, self.cpu, self.ticks = time.perf_counter(), time.process_time(), _cpu_ticks()
        self.last = self.start
        self.timings: dict[str, Any] = {}

    def lap(self, name: str) -> None:
        self.timings[name] = round(time.perf_counter() - self.last, 2)
        self.last = time.perf_counter()

    def finish(self) -> dict[str, Any]:
        self.timings["total_s"] = round(time.perf_counter() - self.start, 2)
        self.timings["process_cpu_s"] = round(time.process_time() - self.cpu, 2)
        # on a shared VM the host can take CPU time ("steal"): wall time then overstates the cost
        self.timings["cpu_steal_fraction"] = _steal_fraction(self.ticks)
        return self.timings


@dataclass
class _Run:
    """What the steps of :func:`run_demo` produce, for the metrics and the artefacts."""

    fsm: FSM
    base: Any = None
    base_info: dict[str, Any] = field(default_factory=dict)
    base_acc: float = 0.0
    base_samples: Any = None
    cm: CodebookModel | None = None
    attach_acc: float = 0.0
    result: TrainResult | None = None
    cb_acc: float = 0.0
    cb_samples: Any = None
    recovery: StateRecovery | None = None
    itv: dict[str, Any] = field(default_factory=dict)


def run_demo(
    out_dir: str | os.PathLike,
    cfg: ExperimentConfig | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    log: Callable[[str], Any] = print,
) -> dict[str, Any]:
    """Run the TokFSM experiment and write its artefacts to ``out_dir``; return the metrics.

    ``cache_dir`` (default :func:`default_cache_dir`) holds trained base models, reused when the
    FSM and base-training settings match.
    """
    cfg = cfg or ExperimentConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    clock = _Clock()
    run = _Run(FSM(cfg.n_states, cfg.n_edges, seed=cfg.fsm_seed))
    run.fsm.save(out / "fsm.json")
    _base_step(run, cfg, cache, progress, log)
    clock.lap("base_model_s")
    _codebook_step(run, cfg, log)
    clock.lap("finetune_s")
    _analysis_step(run, cfg, clock, log)
    log("[6/6] writing artefacts")
    return _write_artefacts(out, run, cfg, clock)


def _base_step(
    run: _Run, cfg: ExperimentConfig, cache: Path, progress: bool, log: Callable[[str], Any]
) -> None:
    """Step 1: the (cached) base model and its transition accuracy."""
    log(f"[1/6] base model ({cfg.base.n_layers} layers, d_model={cfg.base.d_model})")
    run.base, run.base_info = get_base_model(run.fsm, cfg, cache, progress=progress)
    run.base_acc, run.base_samples = transition_accuracy_of(run.base, run.fsm, cfg)
    log(f"      transition accuracy {run.base_acc:.3f} (cached: {run.base_info['cached']})")


def _codebook_step(run: _Run, cfg: ExperimentConfig, log: Callable[[str], Any]) -> None:
    """Steps 2 and 3: codebooks on a copy of the base model, initialised and finetuned."""
    log(f"[2/6] codebooks ({cfg.plan.placement}, k={cfg.plan.k})")
    run.cm = attach_codebooks(clone_model(run.base), cfg.plan, seed=cfg.seed)
    init_codebooks(run.cm, run.fsm, cfg)
    run.attach_acc, _ = transition_accuracy_of(run.cm, run.fsm, cfg)
    log(f"      transition accuracy at attach {run.attach_acc:.3f}")
    log(f"[3/6] finetuning {cfg.train.steps} steps")
    run.result = finetune_codebooks(run.cm, run.fsm, cfg)


def _analysis_step(
    run: _Run, cfg: ExperimentConfig, clock: _Clock, log: Callable[[str], Any]
) -> None:
    """Steps 4 and 5: transition accuracy with codebooks, state recovery, interventions."""
    assert run.cm is not None
    run.cb_acc, run.cb_samples = transition_accuracy_of(run.cm, run.fsm, cfg)
    log(f"      transition accuracy {run.cb_acc:.3f}")
    log("[4/6] state recovery")
    rec = run.recovery = state_recovery(run.cm, run.base, run.fsm, cfg)
    log(
        f"      {rec.states_recovered} states recovered; best-code precision "
        f"{rec.mean_best_code_precision:.3f} vs neuron {rec.mean_best_neuron_precision:.3f}"
    )
    clock.lap("recovery_s")
    log("[5/6] interventions")
    run.itv = interventions(run.cm, run.fsm, cfg)
    log(f"      success rate (all sites) {run.itv['success_rate']:.3f}")
    clock.lap("interventions_s")


EVAL_WALKS = 64
"""Held-out walks of :func:`held_out_evaluation` (a seed the training stream never uses)."""


def held_out_evaluation(
    cm: CodebookModel, base: Any, fsm: FSM, cfg: ExperimentConfig
) -> dict[str, Any]:
    """The SAE-style evaluation (:func:`~codebook_lens.evaluation.evaluate_codebooks`: loss
    recovered, KL, explained variance, usage) of the finetuned codebooks against the base model,
    on held-out walks as long as the training walks."""
    tokens = eval_set(fsm, EVAL_WALKS, cfg.walk_states, seed=cfg.seed + 777)
    return evaluate_codebooks(cm, list(tokens.split(16)), base_model=base).to_dict()


def write_fsm_browse_data(
    out_dir: str | os.PathLike[str], store: CodeStore, labels: Tensor, fsm: FSM
) -> Path:
    """What ``codebook-lens browse out_dir`` reads (:func:`~codebook_lens.browse.
    write_browse_data`): ``store`` and state ``labels`` over the recovery walks, the machine's
    prompt format, and the model in ``out_dir/model`` (as :func:`run_demo` writes it)."""
    vocab = [str(d) for d in range(fsm.base)] + ["<bos>"]
    names = [f"{s:0{fsm.n_digits}d}" for s in range(fsm.n_states)]
    return write_browse_data(
        out_dir, store, labels=labels, label_names=names, vocab=vocab, kind="fsm",
        model="model", prompts=fsm.digit_prompts(),
    )  # fmt: skip


def _write_artefacts(out: Path, run: _Run, cfg: ExperimentConfig, clock: _Clock) -> dict[str, Any]:
    """Step 6: the model, browse data, samples, history, ``metrics.json`` and the report."""
    cm, rec, result = run.cm, run.recovery, run.result
    assert cm is not None and rec is not None and result is not None
    cm.save(out / "model", include_model=True)
    write_fsm_browse_data(out, rec.store, rec.labels, run.fsm)  # for `browse`
    samples = {"base": run.base_samples.tolist(), "codebook": run.cb_samples.tolist()}
    _write_json(out / "samples.json", samples)
    history = {"base": run.base_info.get("history"), "codebook": result.history}
    _write_json(out / "history.json", history)
    metrics = {
        "base": {
            "transition_accuracy": run.base_acc,
            "cached": run.base_info["cached"],
            "train_seconds": run.base_info.get("train_seconds"),
        },
        "codebook": {
            "transition_accuracy": run.cb_acc,
            "transition_accuracy_at_attach": run.attach_acc,
            "placement": cfg.plan.placement,
            "sites": cm.sites,
            "final_train_metrics": result.history[-1] if result.history else {},
        },
        "recovery": rec.metrics(),
        "intervention": run.itv,
        "config": cfg.to_dict(),
    }
    evaluation = held_out_evaluation(cm, run.base, run.fsm, cfg)
    _write_json(out / "evaluation.json", evaluation)
    metrics["evaluation"] = evaluation["all"]
    metrics["timings"] = clock.finish()
    _write_json(out / "metrics.json", metrics)
    write_report(out, metrics, cm, rec, run.fsm, history=result.history)
    return metrics
