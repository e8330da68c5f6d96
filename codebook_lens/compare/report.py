"""The comparisons' tables (mean and standard deviation over seeds) and figures from their
``results.json``: on TokFSM, precision against recall of each state's best feature; on the
topic-stories LM, each topic's best-feature precision and steering ratio."""

from __future__ import annotations

import statistics
from typing import Any

from matplotlib.figure import Figure

__all__ = [
    "FSM_COLUMNS",
    "LM_COLUMNS",
    "summary_rows",
    "fsm_table",
    "lm_table",
    "lm_topic_table",
    "best_feature_figure",
    "topic_figure",
]

FSM_COLUMNS = {
    "explained_variance": ("EV", 3),
    "loss_recovered": ("loss rec.", 3),
    "kl": ("KL", 4),
    "states_recovered": ("states", 1),
    "mean_best_precision": ("best prec.", 3),
    "intervention_success": ("interv.", 3),
}
"""Result keys shown in the TokFSM table: (column title, decimals)."""

LM_COLUMNS = {
    "explained_variance": ("EV", 3),
    "loss_recovered": ("loss rec.", 3),
    "kl": ("KL", 4),
    "mean_topic_precision": ("topic prec.", 3),
    "topics_steered": ("topics >= 10x", 1),
}
"""Result keys shown in the LM table: (column title, decimals)."""


def _cell(values: list[float], decimals: int) -> str:
    mean = statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:.{decimals}f}"
    return f"{mean:.{decimals}f} ± {statistics.stdev(values):.{decimals}f}"


def _groups(result: dict[str, Any]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """The runs by (site, dictionary name), in run order."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for run in result["runs"]:
        groups.setdefault((run["spec"]["site"], run["name"]), []).append(run)
    return groups


def summary_rows(result: dict[str, Any], columns: dict[str, tuple[str, int]]) -> list[list[str]]:
    """One row per (site, dictionary): site, dictionary, seeds, then ``columns`` as
    ``mean ± sd`` over seeds (sample standard deviation)."""
    rows = []
    for (site, name), runs in _groups(result).items():
        cells = [_cell([float(r[key]) for r in runs], d) for key, (_, d) in columns.items()]
        rows.append([site, name, str(len(runs)), *cells])
    return rows


def _table(result: dict[str, Any], columns: dict[str, tuple[str, int]]) -> list[str]:
    head = ["site", "dictionary", "seeds", *(title for title, _ in columns.values())]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return lines + ["| " + " | ".join(r) + " |" for r in summary_rows(result, columns)]


def fsm_table(result: dict[str, Any]) -> str:
    """The TokFSM summary as a Markdown table, the paper-setting row last."""
    lines = _table(result, FSM_COLUMNS)
    paper = result.get("paper_setting")
    if paper:
        lines.append(
            f"| {', '.join(paper['sites'])} | demo codebooks, model finetuned (paper) | 1 | | | | "
            f"{paper['states_recovered']} | {paper['mean_best_precision']:.3f} | "
            f"{paper['intervention_success']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def lm_table(result: dict[str, Any]) -> str:
    """The topic-stories summary as a Markdown table, the paper-setting row last (its
    reconstruction columns are the demo's evaluation of all its codebooks together)."""
    lines = _table(result, LM_COLUMNS)
    paper = result.get("paper_setting")
    if paper:
        ev = paper["evaluation"]
        keys = ("explained_variance", "loss_recovered_zero", "kl_to_base")
        ev_cells = " | ".join(f"{ev[k]:.3f}" if ev.get(k) is not None else "" for k in keys)
        lines.append(
            f"| {', '.join(paper['sites'])} | demo codebooks, model finetuned (paper) | 1 | "
            f"{ev_cells} | {paper['mean_topic_precision']:.3f} | {paper['topics_steered']} |"
        )
    return "\n".join(lines) + "\n"


def lm_topic_table(result: dict[str, Any]) -> str:
    """Per (site, dictionary) and topic: best-feature precision / steering ratio, means over
    seeds; the paper-setting row last."""
    topics = result["topics"]
    lines = ["| site | dictionary | " + " | ".join(topics) + " |"]
    lines.append("|" + "---|" * (2 + len(topics)))

    def cells(precisions: list[list[float]], ratios: list[list[float]]) -> str:
        return " | ".join(
            f"{statistics.fmean(p):.2f} / {statistics.fmean(r):.1f}x"
            for p, r in zip(zip(*precisions), zip(*ratios))
        )

    for (site, name), runs in _groups(result).items():
        ps, rs = [r["topic_precision"] for r in runs], [r["steer_ratio"] for r in runs]
        lines.append(f"| {site} | {name} | {cells(ps, rs)} |")
    paper = result.get("paper_setting")
    if paper:
        rs = [[r if r is not None else 0.0 for r in paper["steer_ratio"]]]
        row = cells([paper["topic_precision"]], rs)
        lines.append(f"| every attn.hook_z | demo codebooks (paper) | {row} |")
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


def topic_figure(result: dict[str, Any]) -> Figure:
    """Per site: each topic's best-feature precision (top) and steering ratio (bottom, log
    scale), one marker per dictionary (mean over seeds); the dashed line is 10x."""
    topics = result["topics"]
    groups = _groups(result)
    sites = list(dict.fromkeys(site for site, _ in groups))
    fig = Figure(figsize=(4.6 * len(sites), 6.4), layout="constrained")
    axes = fig.subplots(2, len(sites), squeeze=False, sharex=True)
    x = range(len(topics))
    for col, site in enumerate(sites):
        top, bottom = axes[0][col], axes[1][col]
        for (s, name), runs in groups.items():
            if s != site:
                continue
            marker = "o" if runs[0]["spec"]["method"] == "codebook" else "x"
            prec = [statistics.fmean(v) for v in zip(*(r["topic_precision"] for r in runs))]
            ratio = [statistics.fmean(v) for v in zip(*(r["steer_ratio"] for r in runs))]
            top.plot(x, prec, marker=marker, lw=0.8, label=name)
            bottom.plot(x, [max(r, 0.1) for r in ratio], marker=marker, lw=0.8, label=name)
        top.set(title=site, ylabel="best-feature precision", ylim=(0, 1.02))
        bottom.set(ylabel="steering ratio", yscale="log")
        bottom.axhline(10, color="grey", lw=0.6, ls="--")
        bottom.set_xticks(list(x), topics, rotation=60, fontsize=7)
        top.legend(fontsize=7, loc="lower left")
    return fig
