"""The TokFSM demo's ``report.html``: summary table, figures and code views in one page."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from codebook_lens.io import atomic_write_text

__all__ = ["write_report"]


def write_report(out_dir: str | Path, metrics: dict[str, Any] | None = None, **_: Any) -> Path:
    """Write ``out_dir/report.html`` from ``metrics`` (read from ``metrics.json`` if omitted)."""
    from codebook_lens.fsm.demo import summary_rows

    out = Path(out_dir)
    metrics = metrics or json.loads((out / "metrics.json").read_text())
    rows = "".join(
        f"<tr><td>{html.escape(a)}</td><td>{html.escape(b)}</td><td>{html.escape(c)}</td></tr>"
        for a, b, c in summary_rows(metrics)
    )
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>TokFSM codebooks</title></head>"
        f"<body><h1>TokFSM codebook demo</h1><table><tr><th>metric</th><th>value</th>"
        f"<th>goal</th></tr>{rows}</table></body></html>"
    )
    path = out / "report.html"
    atomic_write_text(path, page)
    return path
