"""The TokFSM demo's ``report.html``: summary table, figures and interactive code views.

:func:`write_report` keeps the report's inputs next to it (``report.json``, ``figures/``,
``views/``), so ``codebook-lens report DIR`` rebuilds the page without the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from codebook_lens import viz
from codebook_lens.fsm.experiment import StateRecovery
from codebook_lens.fsm.machine import FSM
from codebook_lens.model import CodebookModel

__all__ = ["write_report", "rebuild", "summary_rows"]


def summary_rows(metrics: dict[str, Any]) -> list[tuple[str, str, str]]:
    """``(metric, value, goal)`` rows of the headline numbers of a demo's ``metrics``."""
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


def _precision_matrix(recovery: StateRecovery) -> torch.Tensor:
    """``[n_states, n_columns]``: per state, the precision of every (site, head, code) column
    that is the best code of some state (a readable slice of the full tensor)."""
    results = recovery.results
    best = recovery.best_code
    cols = []
    seen = set()
    for site, head, code in zip(best["site"], best["head"], best["code"]):
        if (site, head, code) in seen:
            continue
        seen.add((site, head, code))
        cols.append(results[site].precision[head, code])  # [n_states]
    return torch.stack(cols, dim=1)


def _views(cm: CodebookModel, fsm: FSM, recovery: StateRecovery) -> dict[str, Any]:
    store, labels = recovery.store, recovery.labels
    first = torch.tensor([0])  # only the first sequence is read (the store may be on disk)
    tokens = store.token_rows(first)[0, :33].long()
    toks = ["BOS" if int(t) == fsm.bos else str(int(t)) for t in tokens]
    views: dict[str, Any] = {}
    attn = [s for s in cm.sites if "attn" in s]
    if attn:
        site = attn[-1]
        codes = store.code_rows(site, first)[0, :33].long()
        views[f"which code fires at {site} (per head)"] = viz.which_code_view(toks, codes)
        _, cache = cm.run_with_cache(tokens[None].to(next(cm.parameters()).device))
        layer = site.split(".")[1]
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"][0].cpu()
        views[f"attention at layer {layer} next to its codes"] = viz.attention_with_codes_view(
            pattern, codes, toks
        )
    best = recovery.best_code
    state = int(labels[0][labels[0] >= 0][0])
    site, head, code = best["site"][state], best["head"][state], best["code"][state]
    c = store.code_rows(site, first)[0, :33].long()
    views[f"best code of state {state}: {site} head {head} code {code}"] = viz.code_tokens_view(
        toks, c if c.shape[1] > 1 else c[:, 0], code=code, head=head if c.shape[1] > 1 else None
    )
    return views


def write_report(
    out_dir: str | Path,
    metrics: dict[str, Any],
    cm: CodebookModel,
    recovery: StateRecovery,
    fsm: FSM,
    history: list[dict[str, float]] | None = None,
) -> Path:
    """Write ``out_dir/report.html`` (and its inputs) for a finished demo run."""
    itv = metrics["intervention"]
    rec = recovery
    present = torch.tensor([p > 0 for p in rec.best_code["recall"]])
    figures = {
        "State x code precision (best code of each state)": viz.state_code_precision_heatmap(
            _precision_matrix(recovery)
        ),
        "Best code vs best neuron (same recall), per state": viz.codes_vs_neurons_bars(
            torch.tensor(rec.best_code["precision"])[present],
            torch.tensor(rec.best_neuron_precision)[present],
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
        "states recovered per site": rec.states_recovered_per_site,
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
