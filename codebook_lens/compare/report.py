"""The comparison's table (mean and standard deviation over seeds) and its figure (precision
against recall of each state's best feature) from ``results.json``."""

from __future__ import annotations

import statistics
from typing import Any

from matplotlib.figure import Figure

__all__ = ["COLUMNS", "summary_rows", "markdown_table", "best_feature_figure"]

COLUMNS = {
    "explained_variance": ("EV", 3),
    "loss_recovered": ("loss rec.", 3),
    "kl": ("KL", 4),
    "states_recovered": ("states", 1),
    "mean_best_precision": ("best prec.", 3),
    "intervention_success": ("interv.", 3),
}
"""Result keys shown in the table: (column title, decimals)."""


def _cell(values: list[float], decimals: int) -> str:
    mean = statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:.{decimals}f}"
    return f"{mean:.{decimals}f} ± {statistics.stdev(values):.{decimals}f}"


def summary_rows(result: dict[str, Any]) -> list[list[str]]:
    """One row per (site, dictionary): site, dictionary, seeds, then :data:`COLUMNS` as
    ``mean ± sd`` over seeds (sample standard deviation)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for run in result["runs"]:
        groups.setdefault((run["spec"]["site"], run["name"]), []).append(run)
    rows = []
    for (site, name), runs in groups.items():
        cells = [_cell([float(r[key]) for r in runs], d) for key, (_, d) in COLUMNS.items()]
        rows.append([site, name, str(len(runs)), *cells])
    return rows


def markdown_table(result: dict[str, Any]) -> str:
    """The summary as a Markdown table, the paper-setting row last."""
    head = ["site", "dictionary", "seeds", *(title for title, _ in COLUMNS.values())]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in summary_rows(result)]
    paper = result.get("paper_setting")
    if paper:
        lines.append(
            f"| {', '.join(paper['sites'])} | demo codebooks, model finetuned (paper) | 1 | | | | "
            f"{paper['states_recovered']} | {paper['mean_best_precision']:.3f} | "
            f"{paper['intervention_success']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def best_feature_figure(result: dict[str, Any], seed: int | None = None) -> Figure:
    """Per site, precision against recall of each state's best feature, one colour per
    dictionary (runs of ``seed``, default the first seed)."""
    seed = result["config"]["seeds"][0] if seed is None else seed
    sites = list(dict.fromkeys(r["spec"]["site"] for r in result["runs"]))
    fig = Figure(figsize=(4.2 * len(sites), 4.0), layout="constrained")
    axes = fig.subplots(1, len(sites), squeeze=False)[0]
    for ax, site in zip(axes, sites):
        for run in (r for r in result["runs"] if r["spec"]["site"] == site):
            if run["spec"]["seed"] != seed:
                continue
            marker = "o" if run["spec"]["method"] == "codebook" else "x"
            ax.scatter(run["best_recall"], run["best_precision"], s=12, marker=marker,
                       alpha=0.7, label=run["name"])  # fmt: skip
        ax.axhline(0.9, color="grey", lw=0.5)
        ax.axvline(0.9, color="grey", lw=0.5)
        ax.set(title=site, xlabel="recall", ylabel="precision", xlim=(0, 1.02), ylim=(0, 1.02))
        ax.legend(fontsize=7, loc="lower left")
    return fig
