"""The grid of dictionaries a comparison trains at every site and seed (a codebook and an SAE of
the same width and k, a wider SAE, an SAE with a larger k), and the loop that trains and measures
them seed by seed, rewriting ``results.json`` after every dictionary."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from codebook_lens.atomic import write_text
from codebook_lens.compare.dictionaries import DictionarySpec
from codebook_lens.validation import Range, ValidatedConfig

__all__ = ["DictionaryGrid", "run_grid", "write_results"]


@dataclass
class DictionaryGrid(ValidatedConfig):
    """Sites, shapes, training tokens and seeds of the dictionaries compared."""

    RANGES: ClassVar[dict[str, Range]] = {
        "width": Range(1, 2**20),
        "k": Range(1, 2**10),
        "wide_factor": Range(1, 64),
        "large_k": Range(1, 2**10),
        "train_tokens": Range(1, 2**40),
    }
    """Bounds of the numeric fields."""

    sites: list[str] = field(
        default_factory=lambda: [
            "blocks.0.hook_mlp_out",
            "blocks.0.hook_resid_post",
            "blocks.0.attn.hook_z",
        ]
    )
    """Sites compared (``attn.hook_z`` flattened over heads: one dictionary)."""

    width: int = 1000
    """Dictionary width of the matched pair."""

    k: int = 1
    """Active features of the matched pair."""

    wide_factor: int = 4
    """The wider SAE has ``wide_factor * width`` features (k unchanged)."""

    large_k: int = 4
    """The SAE with a larger k (width unchanged)."""

    train_tokens: int = 300_000
    """Training tokens of every dictionary."""

    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    """Dictionary seeds (the base model is fixed)."""

    def specs(self, site: str, seed: int) -> list[DictionarySpec]:
        """The dictionaries at ``site``: codebook and SAE at (width, k), a wider SAE and an SAE
        with a larger k."""
        shapes = [("codebook", self.width, self.k), ("sae", self.width, self.k)]
        shapes += [("sae", self.wide_factor * self.width, self.k)]
        shapes += [("sae", self.width, min(self.large_k, self.width))]
        return [
            DictionarySpec(method=m, site=site, width=w, k=k, train_tokens=self.train_tokens,
                           seed=seed)
            for m, w, k in shapes
        ]  # fmt: skip


_LOGGED = (
    "explained_variance",
    "kl",
    "states_recovered",
    "intervention_success",
    "mean_topic_precision",
    "topics_steered",
)
"""Result keys :func:`run_grid` logs after each dictionary, where present."""


def run_grid(
    grid: DictionaryGrid,
    measure: Callable[[DictionarySpec], dict[str, Any]],
    result: dict[str, Any],
    out: Path,
    t0: float,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Append ``measure(spec)`` to ``result["runs"]`` for every dictionary of ``grid``, seed by
    seed (every site of a seed before the next seed), rewriting ``out/results.json`` after each
    so that a stopped run keeps what it measured (``result["seconds"]``: since ``t0``, a
    ``time.perf_counter()`` reading)."""
    result.setdefault("runs", [])
    for seed in grid.seeds:
        for site in grid.sites:
            for spec in grid.specs(site, seed):
                r = measure(spec)
                result["runs"].append(r)
                write_results(result, out, t0)
                shown = ", ".join(f"{k} {r[k]:.3g}" for k in _LOGGED if k in r)
                log(f"{site} {spec.name} seed {seed}: {shown} ({r['seconds']:.0f} s)")
    return result


def write_results(result: dict[str, Any], out: Path, t0: float) -> None:
    """``result`` with its ``seconds`` since ``t0``, written atomically to ``out/results.json``."""
    result["seconds"] = time.perf_counter() - t0
    write_text(out / "results.json", json.dumps(result, indent=1))
