"""The TokFSM demo's ``report.html``: summary table, figures and interactive code views.

:func:`write_report` keeps the report's inputs next to it (``report.json``, ``figures/``,
``views/``), so ``codebook-lens report DIR`` rebuilds the page without the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from codebook_lens import viz
from codebook_lens.fsm.machine import FSM

__all__ = ["write_report", "rebuild"]


def _precision_matrix(recovery: dict[str, Any]) -> torch.Tensor:
    """``[n_states, n_columns]``: per state, the precision of every (site, head, code) column
    that is the best code of some state (a readable slice of the full tensor)."""
    results = recovery["_results"]
    best = recovery["best_code"]
    cols = []
    seen = set()
    for site, head, code in zip(best["site"], best["head"], best["code"]):
        if (site, head, code) in seen:
            continue
        seen.add((site, head, code))
        cols.append(results[site].precision[head, code])  # [n_states]
    return torch.stack(cols, dim=1)


def _views(cm: Any, fsm: FSM, recovery: dict[str, Any]) -> dict[str, Any]:
    store, labels = recovery["_store"], recovery["_labels"]
    tokens = store.tokens[0, :33].long()
    toks = ["BOS" if int(t) == fsm.bos else str(int(t)) for t in tokens]
    views: dict[str, Any] = {}
    attn = [s for s in cm.sites if "attn" in s]
    if attn:
        site = attn[-1]
        codes = store.codes[site][0, :33].long()
        views[f"which code fires at {site} (per head)"] = viz.which_code_view(toks, codes)
        _, cache = cm.run_with_cache(tokens[None].to(next(cm.parameters()).device))
        layer = site.split(".")[1]
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"][0].cpu()
        views[f"attention at layer {layer} next to its codes"] = viz.attention_with_codes_view(
            pattern, codes, toks
        )
    best = recovery["best_code"]
    state = int(labels[0][labels[0] >= 0][0])
    site, head, code = best["site"][state], best["head"][state], best["code"][state]
    c = store.codes[site][0, :33].long()
    views[f"best code of state {state}: {site} head {head} code {code}"] = viz.code_tokens_view(
        toks, c if c.shape[1] > 1 else c[:, 0], code=code, head=head if c.shape[1] > 1 else None
    )
    return views


def write_report(
    out_dir: str | Path,
    metrics: dict[str, Any],
    cm: Any,
    recovery: dict[str, Any],
    fsm: FSM,
    history: list[dict[str, float]] | None = None,
) -> Path:
    """Write ``out_dir/report.html`` (and its inputs) for a finished demo run."""
    from codebook_lens.fsm.demo import summary_rows

    itv = metrics["intervention"]
    rec = recovery
    present = torch.tensor([p > 0 for p in rec["best_code"]["recall"]])
    figures = {
        "State x code precision (best code of each state)": viz.state_code_precision_heatmap(
            _precision_matrix(recovery)
        ),
        "Best code vs best neuron (same recall), per state": viz.codes_vs_neurons_bars(
            torch.tensor(rec["best_code"]["precision"])[present],
            torch.tensor(rec["best_neuron_precision"])[present],
        ),
        "Intervention success per site set": viz.intervention_success_bars(
            {k: v["success_rate"] for k, v in itv["per_site_set"].items()},
            baseline=itv["baseline_success_rate"],
        ),
        "Code usage during finetuning": viz.code_usage_histogram(
            {s: cb.code_counts.flatten() for s, cb in cm.codebooks.items()}
        ),
    }
    if history:
        figures["Codebook finetuning"] = viz.training_curves(history)
    summary = {
        "headline": {a: b for a, b, _ in summary_rows(metrics)},
        "intervention per site set": {
            k: {"success_rate": v["success_rate"], "jsd": v["jsd"]}
            for k, v in itv["per_site_set"].items()
        },
        "states recovered per site": rec["states_recovered_per_site"],
        "timings (s)": metrics["timings"],
    }
    notes = (
        f"TokFSM: {fsm.n_states} states, {fsm.n_edges} successors each. Codebooks "
        f"({metrics['codebook']['placement']}, k={metrics['config']['plan']['k']}) at "
        f"{', '.join(cm.sites)}. Recovery is measured at each state's last digit; interventions "
        "force a target state's codes (from a donor walk ending in it) at the state positions of "
        "prompts ending in other states: the last position and the next state's first digit "
        f"(forcing the last position only, all sites: "
        f"{itv['last_position_only_success_rate']:.3f})."
    )
    return viz.save_report(
        out_dir, "TokFSM codebook features", summary, figures, _views(cm, fsm, recovery), notes
    )


def rebuild(out_dir: str | Path) -> Path:
    """Rebuild ``out_dir/report.html`` from the inputs :func:`write_report` kept."""
    return viz.rebuild_report(out_dir)
