"""The run report: training curves and evaluation tables of a run directory, one HTML file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from codebook_lens.pipeline.rundir import RunDir
from codebook_lens.viz.figures import training_curves
from codebook_lens.viz.report import build_report

__all__ = ["write_run_report", "read_history", "read_evaluation"]

_TRAIN_CURVES = ("loss", "task_loss", "recon", "dead_frac")
_EVAL_CURVES = ("loss_recovered_zero", "kl_to_base", "explained_variance", "dead_frac")


def read_history(run: RunDir) -> list[dict[str, Any]]:
    """The logged training rows (``metrics.jsonl``); ``[]`` before the first log."""
    if not run.metrics.is_file():
        return []
    rows = []
    for i, line in enumerate(run.metrics.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{run.metrics} line {i + 1} is not JSON: {e}") from e
    return rows


def read_evaluation(run: RunDir) -> dict[str, Any] | None:
    """The saved evaluation (``evaluation.json``), or None before ``evaluate`` ran."""
    if not run.evaluation.is_file():
        return None
    return json.loads(run.evaluation.read_text(encoding="utf-8"))


def _figures(history: list[dict[str, Any]]) -> dict[str, Any]:
    figs: dict[str, Any] = {}
    train_keys = [k for k in _TRAIN_CURVES if any(k in r for r in history)]
    if train_keys:
        figs["training"] = training_curves(history, train_keys, title="Training")
    eval_keys = [k for k in (f"all/{m}" for m in _EVAL_CURVES) if any(k in r for r in history)]
    if eval_keys:
        rows = [r for r in history if any(k in r for k in eval_keys)]
        figs["held-out evaluation during training"] = training_curves(
            rows, eval_keys, title="Held-out evaluation (all codebooks)"
        )
    return figs


_GROUPS = {  # one table each: a row per site (that codebook alone) and one for all together
    "held-out loss": ("ce_", "loss_recovered", "kl_to_base"),
    "reconstruction": ("explained_variance", "cosine", "rel_l2"),
    "code usage": ("dead_frac", "dense_frac", "usage_entropy", "effective_codes", "l0", "empty"),
}


def _evaluation_tables(evaluation: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    rows = {**evaluation.get("sites", {}), "all codebooks": evaluation.get("all", {})}
    return {
        f"evaluation: {name}": {
            site: {k: v for k, v in metrics.items() if k.startswith(prefixes)}
            for site, metrics in rows.items()
        }
        for name, prefixes in _GROUPS.items()
    }


def write_run_report(run: RunDir) -> Path:
    """Write ``report.html`` of ``run`` from what its steps saved; return its path."""
    doc = run.read()
    history = read_history(run)
    evaluation = read_evaluation(run)
    summary: dict[str, Any] = {
        "run": {"model": doc["config"]["model"].get("name"), "status": list(doc["status"])},
        "versions": doc.get("versions", {}),
    }
    if evaluation is not None:
        summary.update(_evaluation_tables(evaluation))
    return build_report(
        run.report,
        f"codebook_lens run: {run.path.name}",
        summary=summary,
        figures=_figures(history),
        notes="Metric definitions: docs/evaluation.md of codebook_lens.",
    )
