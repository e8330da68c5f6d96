"""Markdown report of an LM-demo run (tables, not logs)."""

from __future__ import annotations

from typing import Any

__all__ = ["render_report"]


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _loss_lines(metrics: dict[str, Any]) -> list[str]:
    loss = metrics["loss"]
    cfg = metrics["config"]
    return [
        "# codebook-lens lm-demo",
        "",
        f"Model: {cfg['n_layers']} layers, d_model={cfg['d_model']}, {cfg['n_heads']} heads; "
        f"codebooks at every `attn.hook_z`, {cfg['n_codes']} codes per head, k={cfg['k']}.",
        "",
        "## Loss (held-out topic stories)",
        "",
        "| model | loss |",
        "|---|---|",
        f"| base | {loss['base']:.4f} |",
        f"| codebooks, at attach | {loss['codebooks_at_attach']:.4f} |",
        f"| codebooks, finetuned | {loss['codebooks_after_finetuning']:.4f} |",
        "",
        f"Relative increase: **{_pct(loss['relative_increase'])}** (goal <= 10%: "
        f"{'met' if loss['goal_met'] else 'NOT met'}).",
        "",
    ]


def _steering_lines(metrics: dict[str, Any]) -> list[str]:
    lines = [
        "## Topic codes and steering",
        "",
        "| topic | best code precision | recall | heads steered | codes forced | unsteered "
        "| steered | ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for topic, tc in metrics["topic_codes"].items():
        st = metrics["steering"][topic]
        ratio = st.get("ratio")
        lines.append(
            f"| {topic} | {tc['best_precision']:.3f} | {tc['best_recall']:.3f} | "
            f"{st['n_heads']} | {st['n_codes']} | {_pct(st.get('unsteered_rate'))} | "
            f"{_pct(st.get('steered_rate'))} | {'n/a' if ratio is None else f'{ratio:.1f}x'} |"
        )
    s = metrics["steering_summary"]
    lines += [
        "",
        f"Topics steered to >= 10x their unsteered rate: **{s['topics_with_10x']} of "
        f"{s['n_topics']}** (goal: most; {'met' if s['goal_met'] else 'NOT met'}).",
        "",
        "Steered examples (the first sample the classifier counts as on topic):",
        "",
    ]
    for topic, st in metrics["steering"].items():
        if st.get("example") is not None:
            note = "" if st.get("example_on_topic", True) else " (no sample on topic)"
            lines.append(f"- **{topic}**{note}: {st['example'].strip()}")
    lines += ["", "Unsteered examples:", ""]
    lines += [f"- {t.strip()}" for t in s["baseline_examples"]]
    return lines


def _time_lines(metrics: dict[str, Any]) -> list[str]:
    return [
        "",
        "## Time",
        "",
        "| stage | seconds |",
        "|---|---|",
        *[f"| {k} | {v:.1f} |" for k, v in metrics["timings_s"].items()],
        f"| total | {metrics['wall_time_s']:.1f} |",
        "",
    ]


def render_report(metrics: dict[str, Any]) -> str:
    """The ``report.md`` text for the metrics dict of :func:`~codebook_lens.lm.run_lm_demo`:
    the loss table, the topic codes and steering table with examples, and the timings."""
    lines = _loss_lines(metrics) + _steering_lines(metrics) + _time_lines(metrics)
    return "\n".join(lines)
