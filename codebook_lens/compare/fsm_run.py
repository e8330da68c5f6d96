"""The codes-versus-SAEs experiment on TokFSM: every dictionary of :class:`FSMCompareConfig` at
every site and seed, trained on the frozen demo base model, measured the same way; plus the demo's
own finetuned codebooks (the paper's setting) as a reference row. Writes ``results.json``."""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from codebook_lens.compare.dictionaries import (
    DictionarySpec,
    as_sae_model,
    save_sae,
    train_dictionary,
)
from codebook_lens.compare.fsm_task import force_state_success, recovery_tokens, state_features
from codebook_lens.compare.grid import DictionaryGrid, run_grid, write_results
from codebook_lens.compare.splice import mean_active_values, splice_metrics
from codebook_lens.fsm.data import eval_set
from codebook_lens.fsm.experiment import (
    ExperimentConfig,
    cached_codebook_model,
    get_base_model,
    interventions,
    state_recovery,
)
from codebook_lens.fsm.machine import FSM
from codebook_lens.validation import Range

__all__ = ["FSMCompareConfig", "compare_fsm"]


@dataclass
class FSMCompareConfig(DictionaryGrid):
    """Settings of the TokFSM comparison (the grid's defaults: the demo's 1000 codes, k=1)."""

    RANGES: ClassVar[dict[str, Range]] = {
        **DictionaryGrid.RANGES,
        "eval_walks": Range(1, 2**20),
    }
    """Bounds of the numeric fields."""

    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)
    """The TokFSM demo's settings: its FSM, base model and finetuned codebooks."""

    eval_walks: int = 256
    """Held-out walks for explained variance, loss recovered and KL."""

    @classmethod
    def small(cls) -> FSMCompareConfig:
        """A minutes-long version on the demo's small TokFSM (for the tests)."""
        return cls(
            experiment=ExperimentConfig.small(), width=32, wide_factor=2, large_k=2,
            train_tokens=20_000, eval_walks=32, seeds=[0, 1],
        )  # fmt: skip


def _measure(model, fsm, ecfg, spec, data, out: Path) -> dict[str, Any]:
    train, held_out, recovery = data
    t0 = time.perf_counter()
    sae = train_dictionary(model, train, spec)
    trained = time.perf_counter() - t0
    save_sae(sae, out / "saes" / spec.site / spec.dirname)
    sf = state_features(model, sae, fsm, recovery)
    means = mean_active_values(model, sae, recovery)
    return {
        "spec": spec.to_dict(),
        "name": spec.name,
        **splice_metrics(model, sae, held_out),
        **sf.metrics(),
        "intervention_success": force_state_success(model, sae, fsm, ecfg, means),
        "train_seconds": trained,
        "seconds": time.perf_counter() - t0,
    }


def _paper_setting(fsm: FSM, ecfg: ExperimentConfig, cache_dir: Path) -> dict[str, Any]:
    """The demo's finetuned codebooks (all sites, model finetuned too), by the demo's metrics."""
    quiet = dataclasses.replace(ecfg, train=dataclasses.replace(ecfg.train, progress=False))
    cm, base = cached_codebook_model(fsm, quiet, cache_dir, progress=False, log=lambda m: None)
    rec = state_recovery(cm, base, fsm, ecfg)
    return {
        "sites": cm.sites,
        "states_recovered": rec.states_recovered,
        "states_recovered_per_site": rec.states_recovered_per_site,
        "mean_best_precision": rec.mean_best_code_precision,
        "intervention_success": interventions(cm, fsm, ecfg)["success_rate"],
    }


def compare_fsm(cfg: FSMCompareConfig, out: Path, cache_dir: Path, log=print) -> dict[str, Any]:
    """Run the comparison (:func:`~codebook_lens.compare.grid.run_grid`: ``out/results.json``
    after every dictionary); the paper-setting row comes last. Returns what it wrote."""
    t0, ecfg = time.perf_counter(), cfg.experiment
    torch.manual_seed(ecfg.seed)
    fsm = FSM(ecfg.n_states, ecfg.n_edges, seed=ecfg.fsm_seed)
    base, _ = get_base_model(fsm, ecfg, cache_dir, progress=False)
    model = as_sae_model(base)
    ctx = 1 + ecfg.walk_states * fsm.n_digits
    train = eval_set(fsm, math.ceil(cfg.train_tokens / ctx), ecfg.walk_states, ecfg.seed + 10)
    held_out = list(eval_set(fsm, cfg.eval_walks, ecfg.walk_states, ecfg.seed + 11).split(32))
    data = (train, held_out, recovery_tokens(fsm, ecfg))
    result: dict[str, Any] = {"config": cfg.to_dict(), "runs": [], "paper_setting": None}
    result["torch_threads"] = torch.get_num_threads()

    def measure(spec: DictionarySpec) -> dict[str, Any]:
        return _measure(model, fsm, ecfg, spec, data, out)

    run_grid(cfg, measure, result, out, t0, log)
    result["paper_setting"] = _paper_setting(fsm, ecfg, cache_dir)
    write_results(result, out, t0)
    return result
