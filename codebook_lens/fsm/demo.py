"""`run_demo`: the whole TokFSM experiment, writing its artefacts to one directory.

Contents of ``out_dir``: ``fsm.json``, ``samples.json`` (token ids behind the accuracy figures),
``metrics.json``, ``history.json`` (training curves), ``model/`` (a saved CodebookModel with its
base model) and ``report.html``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from codebook_lens.atomic import write_text
from codebook_lens.browse import write_fsm_browse_data
from codebook_lens.fsm.experiment import (
    ExperimentConfig,
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

__all__ = ["run_demo", "default_cache_dir", "summary_rows"]


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


def summary_rows(metrics: dict[str, Any]) -> list[tuple[str, str, str]]:
    """``(metric, value, goal)`` rows of the headline numbers."""
    rec, itv = metrics["recovery"], metrics["intervention"]
    rows = [
        ("base transition accuracy", f"{metrics['base']['transition_accuracy']:.3f}", ">= 0.96"),
        ("codebook transition accuracy at attach",
         f"{metrics['codebook']['transition_accuracy_at_attach']:.3f}", ""),
        ("codebook transition accuracy", f"{metrics['codebook']['transition_accuracy']:.3f}",
         ">= 0.95"),
        ("states recovered (P, R >= 0.9)",
         f"{rec['states_recovered']} / {rec['states_present']}", ">= 90"),
        ("mean best-code precision", f"{rec['mean_best_code_precision']:.3f}", "paper ~0.97"),
        ("mean best-neuron precision (same recall)",
         f"{rec['mean_best_neuron_precision']:.3f}", "paper ~0.70"),
        ("intervention success (all sites)", f"{itv['success_rate']:.3f}", ">= 0.9"),
        ("intervention success (all, last position only)",
         f"{itv['last_position_only_success_rate']:.3f}", ""),
        ("intervention baseline (no patch)", f"{itv['baseline_success_rate']:.3f}", ""),
    ]  # fmt: skip
    rows += [
        (f"intervention success ({name})", f"{v['success_rate']:.3f}", "")
        for name, v in itv["per_site_set"].items()
        if name != "all"
    ]
    t = metrics["timings"]
    steal = t.get("cpu_steal_fraction")
    note = f" (host CPU steal {100 * steal:.0f}%)" if steal else ""
    rows.append(("total time (s)", f"{t['total_s']:.0f}{note}", "<= 600"))
    return rows


def run_demo(
    out_dir: str | os.PathLike,
    cfg: ExperimentConfig | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    log: Any = print,
) -> dict[str, Any]:
    """Run the TokFSM experiment and write its artefacts to ``out_dir``; return the metrics.

    ``cache_dir`` (default :func:`default_cache_dir`) holds trained base models, reused when the
    FSM and base-training settings match.
    """
    cfg = cfg or ExperimentConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    t_start, cpu_start, ticks_start = time.perf_counter(), time.process_time(), _cpu_ticks()
    timings: dict[str, Any] = {}

    def lap(name: str, t0: float) -> float:
        timings[name] = round(time.perf_counter() - t0, 2)
        return time.perf_counter()

    t = time.perf_counter()
    fsm = FSM(cfg.n_states, cfg.n_edges, seed=cfg.fsm_seed)
    fsm.save(out / "fsm.json")
    log(f"[1/6] base model ({cfg.base.n_layers} layers, d_model={cfg.base.d_model})")
    base, base_info = get_base_model(fsm, cfg, cache, progress=progress)
    base_acc, base_samples = transition_accuracy_of(base, fsm, cfg)
    log(f"      transition accuracy {base_acc:.3f} (cached: {base_info['cached']})")
    t = lap("base_model_s", t)

    log(f"[2/6] codebooks ({cfg.plan.placement}, k={cfg.plan.k})")
    cm = attach_codebooks(clone_model(base), cfg.plan, seed=cfg.seed)
    init_codebooks(cm, fsm, cfg)
    attach_acc, _ = transition_accuracy_of(cm, fsm, cfg)
    log(f"      transition accuracy at attach {attach_acc:.3f}")
    log(f"[3/6] finetuning {cfg.train.steps} steps")
    result = finetune_codebooks(cm, fsm, cfg)
    t = lap("finetune_s", t)
    cb_acc, cb_samples = transition_accuracy_of(cm, fsm, cfg)
    log(f"      transition accuracy {cb_acc:.3f}")

    log("[4/6] state recovery")
    recovery = state_recovery(cm, base, fsm, cfg)
    log(
        f"      {recovery['states_recovered']} states recovered; best-code precision "
        f"{recovery['mean_best_code_precision']:.3f} vs neuron "
        f"{recovery['mean_best_neuron_precision']:.3f}"
    )
    t = lap("recovery_s", t)
    log("[5/6] interventions")
    itv = interventions(cm, fsm, cfg)
    log(f"      success rate (all sites) {itv['success_rate']:.3f}")
    t = lap("interventions_s", t)

    log("[6/6] writing artefacts")
    cm.save(out / "model", include_model=True)
    write_fsm_browse_data(out, recovery["_store"], recovery["_labels"], fsm)  # for `browse`
    _write_json(
        out / "samples.json", {"base": base_samples.tolist(), "codebook": cb_samples.tolist()}
    )
    _write_json(
        out / "history.json", {"base": base_info.get("history"), "codebook": result.history}
    )
    metrics = {
        "base": {
            "transition_accuracy": base_acc,
            "cached": base_info["cached"],
            "train_seconds": base_info.get("train_seconds"),
        },
        "codebook": {
            "transition_accuracy": cb_acc,
            "transition_accuracy_at_attach": attach_acc,
            "placement": cfg.plan.placement,
            "sites": cm.sites,
            "final_train_metrics": result.history[-1] if result.history else {},
        },
        "recovery": {k: v for k, v in recovery.items() if not k.startswith("_")},
        "intervention": itv,
        "config": cfg.to_dict(),
    }
    timings["total_s"] = round(time.perf_counter() - t_start, 2)
    timings["process_cpu_s"] = round(time.process_time() - cpu_start, 2)
    # on a shared VM the host can take CPU time ("steal"): wall time then overstates the cost
    timings["cpu_steal_fraction"] = _steal_fraction(ticks_start)
    metrics["timings"] = timings
    _write_json(out / "metrics.json", metrics)
    from codebook_lens.fsm.report import write_report

    write_report(out, metrics, cm, recovery, fsm, history=result.history)
    return metrics
