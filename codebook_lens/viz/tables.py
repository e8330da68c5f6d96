"""Summary tables: a nested metrics dict as HTML tables, for the report page."""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["summary_tables"]


def _fmt(v: Any) -> str:
    if hasattr(v, "tolist") and not isinstance(v, str):
        v = v.tolist()
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
    if isinstance(v, (list, tuple)):
        return ", ".join(_fmt(x) for x in v)
    return str(v)


def _is_scalar(v: Any) -> bool:
    if hasattr(v, "ndim") and not isinstance(v, str):
        return v.ndim == 0 or v.ndim == 1 and len(v) <= 8
    if isinstance(v, (list, tuple)):
        return len(v) <= 8 and all(_is_scalar(x) and not isinstance(x, (list, tuple)) for x in v)
    return not isinstance(v, Mapping)


def _flatten(d: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out += _flatten(v, key + " / ")
        elif isinstance(v, (list, tuple)) and not _is_scalar(v):
            out += _flatten({str(i): x for i, x in enumerate(v)}, key + " / ")
        else:
            out.append((key, v))
    return out


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    th = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join(
        "<tr>"
        + "".join(
            f"<th>{html.escape(str(c))}</th>" if j == 0 else f"<td>{html.escape(_fmt(c))}</td>"
            for j, c in enumerate(r)
        )
        + "</tr>"
        for r in rows
    )
    return f'<table class="cl-table"><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>'


def _records_table(name_col: str, records: Sequence[tuple[str, Mapping[str, Any]]]) -> str:
    cols: list[str] = []
    for _, rec in records:
        cols += [k for k in rec if k not in cols]
    rows = [[name] + [rec.get(c) for c in cols] for name, rec in records]
    return _table([name_col, *cols], rows)


def summary_tables(summary: Mapping[str, Any]) -> list[tuple[str, str]]:
    """HTML tables for a nested metrics dict, as ``(heading, table_html)`` pairs.

    Top-level scalars form an "Overview" key/value table. A top-level mapping whose values are
    all flat mappings (e.g. ``{"attn": {"acc": .., "prec": ..}, "mlp": {..}}``), or a list of
    flat mappings, becomes a table with one row per entry and one column per key. Any other
    mapping becomes a key/value table with nested keys joined by ``" / "``.
    """
    if not isinstance(summary, Mapping):
        raise TypeError(f"summary must be a mapping of metrics, got {type(summary).__name__}")
    out: list[tuple[str, str]] = []
    overview = [(k, v) for k, v in summary.items() if _is_scalar(v)]
    if overview:
        out.append(("Overview", _table(["metric", "value"], overview)))

    def flat(m: Any) -> bool:
        return isinstance(m, Mapping) and all(_is_scalar(x) for x in m.values())

    for k, v in summary.items():
        if _is_scalar(v):
            continue
        if isinstance(v, Mapping) and v and all(flat(x) for x in v.values()):
            out.append((str(k), _records_table("", [(str(n), r) for n, r in v.items()])))
        elif isinstance(v, (list, tuple)) and v and all(flat(x) for x in v):
            out.append((str(k), _records_table("#", [(str(i), r) for i, r in enumerate(v)])))
        elif isinstance(v, Mapping):
            out.append((str(k), _table(["metric", "value"], _flatten(v))))
        else:
            out.append((str(k), _table(["index", "value"], _flatten({str(k): v}))))
    return out
