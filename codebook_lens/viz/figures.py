"""matplotlib figures for codebook analyses; each function returns a ``Figure``.

Figures are built as ``matplotlib.figure.Figure`` objects with their own Agg canvas: nothing
touches pyplot's global state or the process's backend, so they are safe in scripts, tests,
servers and notebooks (a notebook displays a returned ``Figure`` as an image). Save one with
``fig.savefig(path)`` or embed it in a report with :func:`figure_to_data_uri`.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
from jaxtyping import Real
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from torch import Tensor

__all__ = [
    "state_code_precision_heatmap",
    "codes_vs_neurons_bars",
    "intervention_success_bars",
    "code_usage_histogram",
    "training_curves",
    "figure_to_data_uri",
    "diagonal_order",
    "new_figure",
]

CODE_COLOR = "#1f77b4"
NEURON_COLOR = "#9e9e9e"
DEAD_COLOR = "#d62728"


def new_figure(width: float, height: float) -> Figure:
    """An empty ``width`` x ``height`` inch ``Figure`` (constrained layout) on its own Agg
    canvas, outside pyplot's global state."""
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _np(x: Tensor | np.ndarray | Sequence[float], name: str, ndim: int) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu().double().numpy()
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s); got shape {a.shape}")
    if a.size == 0:
        raise ValueError(f"{name} is empty (shape {a.shape})")
    if np.isinf(a).any():
        raise ValueError(f"{name} holds infinite values")
    return a


def diagonal_order(matrix: np.ndarray) -> np.ndarray:
    """Column order that makes a ``[rows, cols]`` score matrix look diagonal: columns sorted by
    the row of their maximum, then by that maximum (descending). NaN counts as missing."""
    filled = np.where(np.isnan(matrix), -np.inf, matrix)
    best_row = filled.argmax(0)
    best = filled.max(0)
    return np.lexsort((-best, best_row))


def state_code_precision_heatmap(
    precision: Real[Tensor, "n_states n_codes"] | Real[np.ndarray, "n_states n_codes"],
    code_ids: Sequence[int] | None = None,
    state_labels: Sequence[str] | None = None,
    sort: bool = True,
    max_codes: int | None = 200,
    title: str = "Code precision per state",
) -> Figure:
    """Heatmap of precision (0..1): one row per FSM state, one column per code.

    ``precision[s, c]`` is the precision of code ``c`` as a detector of state ``s`` (NaN: the
    code never fires; drawn grey). ``code_ids`` names the columns (default ``0..n-1``). With
    ``max_codes`` only the columns with the highest best precision are kept, and with ``sort``
    columns are put in :func:`diagonal_order`, so a code set that recovers the states shows a
    diagonal. The x tick labels are the kept code ids when there are at most 40 columns.
    """
    p = _np(precision, "precision", 2)
    n_states, n_codes = p.shape
    ids = np.arange(n_codes) if code_ids is None else np.asarray(list(code_ids))
    if ids.shape != (n_codes,):
        raise ValueError(f"code_ids has {ids.shape[0]} ids but precision has {n_codes} columns")
    if state_labels is not None and len(state_labels) != n_states:
        raise ValueError(
            f"state_labels has {len(state_labels)} names but precision has {n_states} rows"
        )
    finite = p[~np.isnan(p)]
    if finite.size and (finite.min() < 0 or finite.max() > 1):
        raise ValueError(
            f"precision must lie in [0, 1]; got [{finite.min():.3g}, {finite.max():.3g}]"
        )
    cols = np.arange(n_codes)
    if max_codes is not None and n_codes > max_codes:
        best = np.where(np.isnan(p), -1.0, p).max(0)
        cols = np.sort(np.argsort(-best, kind="stable")[:max_codes])
    if sort:
        cols = cols[diagonal_order(p[:, cols])]
    shown = p[:, cols]
    fig = new_figure(min(16.0, 3.0 + 0.12 * len(cols)), min(12.0, 2.5 + 0.09 * n_states))
    ax = fig.add_subplot()
    cmap = _viridis_with_bad()
    im = ax.imshow(
        np.ma.masked_invalid(shown), aspect="auto", cmap=cmap, vmin=0.0, vmax=1.0,
        interpolation="nearest",
    )  # fmt: skip
    fig.colorbar(im, ax=ax, label="precision")
    ax.set_xlabel("code" + (" (sorted by best state)" if sort else ""))
    ax.set_ylabel("state")
    ax.set_title(title)
    if len(cols) <= 40:
        ax.set_xticks(range(len(cols)), [str(int(i)) for i in ids[cols]], rotation=90, fontsize=7)
    if state_labels is not None and n_states <= 40:
        ax.set_yticks(range(n_states), list(state_labels), fontsize=7)
    return fig


def _viridis_with_bad():
    import matplotlib

    return matplotlib.colormaps["viridis"].with_extremes(bad="#dddddd")


def codes_vs_neurons_bars(
    code_prec: Real[Tensor, " n"] | Real[np.ndarray, " n"],
    neuron_prec: Real[Tensor, " n"] | Real[np.ndarray, " n"],
    labels: Sequence[str] | None = None,
    sort: bool = True,
    title: str = "Best code vs best neuron, per state",
) -> Figure:
    """Paired bars: for each feature (e.g. FSM state) the precision of its best code and of its
    best neuron (the baseline), with both means as dashed lines.

    ``sort`` orders features by code precision (highest first); ``labels`` name the features
    (shown when there are at most 40).
    """
    c = _np(code_prec, "code_prec", 1)
    n = _np(neuron_prec, "neuron_prec", 1)
    if c.shape != n.shape:
        raise ValueError(
            f"code_prec has {c.shape[0]} values but neuron_prec has {n.shape[0]}; give one "
            "value per feature to both"
        )
    if labels is not None and len(labels) != c.shape[0]:
        raise ValueError(f"labels has {len(labels)} names but there are {c.shape[0]} values")
    order = np.argsort(-np.nan_to_num(c, nan=-1.0), kind="stable") if sort else np.arange(len(c))
    x = np.arange(len(c))
    w = 0.42
    fig = new_figure(min(16.0, 4.0 + 0.12 * len(c)), 3.6)
    ax = fig.add_subplot()
    ax.bar(x - w / 2, c[order], w, color=CODE_COLOR, label=f"code (mean {np.nanmean(c):.3f})")
    ax.bar(x + w / 2, n[order], w, color=NEURON_COLOR, label=f"neuron (mean {np.nanmean(n):.3f})")
    ax.axhline(np.nanmean(c), color=CODE_COLOR, ls="--", lw=1)
    ax.axhline(np.nanmean(n), color=NEURON_COLOR, ls="--", lw=1)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("precision")
    ax.set_xlabel("feature" + (" (sorted by code precision)" if sort else ""))
    if labels is not None and len(c) <= 40:
        ax.set_xticks(x, [labels[i] for i in order], rotation=90, fontsize=7)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    ax.set_title(title)
    return fig


def intervention_success_bars(
    rates: Mapping[str, float],
    baseline: float | None = None,
    errors: Mapping[str, float] | None = None,
    ylabel: str = "intervention success",
    title: str = "Intervention success per site set",
) -> Figure:
    """One bar per site set (in the mapping's order) with its success rate written on top;
    ``errors`` adds error bars (same keys), ``baseline`` a dashed reference line (e.g. chance).
    """
    if not rates:
        raise ValueError("intervention_success_bars: rates is empty")
    names = [str(k) for k in rates]
    vals = np.array([float(v) for v in rates.values()])
    if not np.isfinite(vals).all():
        raise ValueError(f"rates must be finite; got {dict(zip(names, vals.tolist()))}")
    err = None
    if errors is not None:
        if set(map(str, errors)) != set(names):
            raise ValueError(
                f"errors has keys {sorted(map(str, errors))} but rates has {sorted(names)}"
            )
        err = np.array([float(errors[k]) for k in rates])
    fig = new_figure(max(4.0, 1.2 + 0.9 * len(names)), 3.6)
    ax = fig.add_subplot()
    bars = ax.bar(range(len(names)), vals, yerr=err, color=CODE_COLOR, capsize=3)
    ax.bar_label(bars, labels=[f"{v:.2f}" for v in vals], padding=2, fontsize=8)
    if baseline is not None:
        ax.axhline(baseline, color="k", ls="--", lw=1, label=f"baseline {baseline:.2f}")
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    tilt = len(names) > 4 or max(len(n) for n in names) > 6
    ax.set_xticks(
        range(len(names)), names, rotation=30 if tilt else 0, ha="right" if tilt else "center"
    )
    top = max(1.0, float(vals.max()) if err is None else float((vals + err).max()))
    ax.set_ylim(min(0.0, float(vals.min())), top * 1.1)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return fig


CountsLike = Real[Tensor, "*head n_codes"] | Real[np.ndarray, "*head n_codes"]


def code_usage_histogram(
    counts: CountsLike | Mapping[str, CountsLike],
    bins: int = 30,
    title: str = "Code usage",
) -> Figure:
    """Histogram of how often each code fires (log-spaced bins), one panel per site.

    ``counts`` is per-code usage ``[n_codes]`` or ``[head, n_codes]`` (heads are pooled), e.g.
    ``codebook.code_counts``, or a mapping site -> counts. Dead codes (count 0) cannot sit on a
    log axis: their number and fraction are in each panel's title.
    """
    items = dict(counts) if isinstance(counts, Mapping) else {"": counts}
    if not items:
        raise ValueError("code_usage_histogram: counts is empty")
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    n = len(items)
    ncols = min(3, n)
    nrows = math.ceil(n / ncols)
    fig = new_figure(4.2 * ncols, 3.2 * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, (site, cnt) in zip(axes, items.items()):
        a = _np(cnt, f"counts[{site!r}]" if site else "counts", len(np.shape(cnt))).ravel()
        if np.isnan(a).any() or (a < 0).any():
            raise ValueError(f"counts{f'[{site!r}]' if site else ''} must be >= 0 and not NaN")
        live = a[a > 0]
        dead = int((a == 0).sum())
        if live.size:
            hi = max(float(live.max()), float(live.min()) * 1.0001, 1.0)
            edges = np.geomspace(max(float(live.min()), 1e-12), hi * 1.0001, bins + 1)
            ax.hist(live, bins=edges, color=CODE_COLOR)
            ax.set_xscale("log")
        ax.set_xlabel("times used")
        ax.set_ylabel("codes")
        name = f"{site}\n" if site else ""
        color = DEAD_COLOR if dead else "black"
        ax.set_title(
            f"{name}{a.size} codes, {dead} dead ({dead / a.size:.1%})", fontsize=9, color=color
        )
    for ax in axes[n:]:
        ax.set_visible(False)
    fig.suptitle(title)
    return fig


_DEFAULT_CURVES = ("loss", "task_loss", "recon", "dead_frac")


def training_curves(
    history: Sequence[Mapping[str, float]],
    keys: Sequence[str] | None = None,
    title: str = "Training",
) -> Figure:
    """One panel per metric against ``step`` from ``TrainResult.history`` rows.

    ``keys`` defaults to ``loss``, ``task_loss``, ``recon``, ``dead_frac`` and any other numeric
    metric in the rows (e.g. eval accuracy) except ``step`` and ``lr``. A row without a metric
    leaves a gap. Losses that span over two decades use a log axis.
    """
    if not history:
        raise ValueError("training_curves: history is empty")
    for i, row in enumerate(history):
        if "step" not in row:
            raise ValueError(f"history row {i} has no 'step' (keys: {sorted(row)})")
    present: list[str] = []
    for row in history:
        present += [k for k in row if k not in present]
    if keys is None:
        extra = [k for k in present if k not in _DEFAULT_CURVES and k not in ("step", "lr")]
        keys = [k for k in _DEFAULT_CURVES if k in present] + extra
    else:
        missing = [k for k in keys if k not in present]
        if missing:
            raise ValueError(f"history has no {missing}; its metrics are {present}")
    if not keys:
        raise ValueError("training_curves: no metric to plot (rows hold only step/lr)")
    steps = np.array([float(r["step"]) for r in history])
    n = len(keys)
    ncols = min(3, n)
    nrows = math.ceil(n / ncols)
    fig = new_figure(4.2 * ncols, 3.0 * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, key in zip(axes, keys):
        y = np.array([float(r.get(key, np.nan)) for r in history])
        ax.plot(steps, y, marker="." if len(y) < 30 else None, color=CODE_COLOR)
        pos = y[np.isfinite(y)]
        if key != "dead_frac" and pos.size and pos.min() > 0 and pos.max() / pos.min() > 100:
            ax.set_yscale("log")
        if key == "dead_frac":
            ax.set_ylim(0, 1)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("step")
    for ax in axes[n:]:
        ax.set_visible(False)
    fig.suptitle(title)
    return fig


def figure_to_data_uri(fig: Figure, fmt: Literal["png", "svg"] = "png", dpi: int = 100) -> str:
    """The figure as a ``data:`` URI (base64 PNG or SVG) for an ``<img src=..>`` that needs no
    file or network. Metadata that varies between runs (dates) is left out."""
    if fmt not in ("png", "svg"):
        raise ValueError(f"fmt={fmt!r}; choose 'png' or 'svg'")
    import matplotlib

    buf = io.BytesIO()
    meta = {"Software": None} if fmt == "png" else {"Date": None}
    with matplotlib.rc_context({"svg.hashsalt": "codebook_lens"}):  # stable SVG element ids
        fig.savefig(buf, format=fmt, dpi=dpi, metadata=meta)
    mime = "image/png" if fmt == "png" else "image/svg+xml"
    return f"data:{mime};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"
