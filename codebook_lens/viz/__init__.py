"""Visual reports: offline circuitsvis views of codes, matplotlib figures, one-file HTML reports.

- :mod:`~codebook_lens.viz.offline`: :class:`View`, circuitsvis with its JavaScript bundle
  inlined (never the CDN), once per page;
- :mod:`~codebook_lens.viz.codes`: tokens coloured by a code / by which code fires, top
  contexts of codes, attention patterns next to per-head codes;
- :mod:`~codebook_lens.viz.figures`: matplotlib ``Figure`` builders (no pyplot state);
- :mod:`~codebook_lens.viz.report`: the self-contained ``report.html`` (its summary tables in
  :mod:`~codebook_lens.viz.tables`, its offline check in :mod:`~codebook_lens.viz.ref_scanner`);
- :mod:`~codebook_lens.viz.notebook`: :func:`show` a figure or view inline in a notebook, or
  save it from a script;
- :mod:`~codebook_lens.viz.browser`: load a page in headless Chromium and list what failed.
"""

from typing import Any

from codebook_lens.viz.codes import (
    attention_with_codes_view,
    code_color,
    code_fires,
    code_tokens_view,
    codes_grid_view,
    contexts_from_windows,
    top_contexts_view,
    which_code_view,
)
from codebook_lens.viz.figures import (
    code_usage_histogram,
    codes_vs_neurons_bars,
    figure_to_data_uri,
    intervention_success_bars,
    new_figure,
    state_code_precision_heatmap,
    training_curves,
)
from codebook_lens.viz.notebook import in_notebook, show
from codebook_lens.viz.offline import View, circuitsvis_view, from_circuitsvis, html_view
from codebook_lens.viz.ref_scanner import external_refs
from codebook_lens.viz.report import build_report, rebuild_report, report_html, save_report

__all__ = [
    "View",
    "circuitsvis_view",
    "html_view",
    "from_circuitsvis",
    "code_fires",
    "code_color",
    "code_tokens_view",
    "which_code_view",
    "codes_grid_view",
    "top_contexts_view",
    "contexts_from_windows",
    "attention_with_codes_view",
    "state_code_precision_heatmap",
    "codes_vs_neurons_bars",
    "intervention_success_bars",
    "code_usage_histogram",
    "training_curves",
    "figure_to_data_uri",
    "new_figure",
    "show",
    "in_notebook",
    "build_report",
    "report_html",
    "save_report",
    "rebuild_report",
    "external_refs",
    "check_page",
    "find_chromium",
    "BrowserCheck",
]


def __getattr__(name: str) -> Any:
    """``check_page``, ``find_chromium`` and ``BrowserCheck`` load on first use, so that
    ``python -m codebook_lens.viz.browser`` runs the module cleanly."""
    if name in ("check_page", "find_chromium", "BrowserCheck"):
        from codebook_lens.viz import browser

        return getattr(browser, name)
    raise AttributeError(f"module 'codebook_lens.viz' has no attribute {name!r}")
