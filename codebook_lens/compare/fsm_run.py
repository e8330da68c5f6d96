"""The codes-versus-SAEs experiment on TokFSM: every dictionary of :class:`CompareConfig` at every
site and seed, trained on the frozen demo base model, measured the same way; plus the demo's own
finetuned codebooks (the paper's setting) as a reference row. Writes ``results.json``."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from sae_lens import SAE, HookedSAETransformer
from safetensors.torch import save
from torch import nn

from codebook_lens.atomic import write_file, write_text
from codebook_lens.compare.dictionaries import DictionarySpec, train_dictionary
from codebook_lens.compare.fsm_task import (
    force_state_success,
    mean_active_values,
    recovery_tokens,
    state_features,
)
from codebook_lens.compare.splice import splice_metrics
from codebook_lens.fsm.data import eval_set
from codebook_lens.fsm.experiment import (
    ExperimentConfig,
    cached_codebook_model,
    get_base_model,
    interventions,
    state_recovery,
)
from codebook_lens.fsm.machine import FSM
from codebook_lens.validation import Range, ValidatedConfig

__all__ = ["CompareConfig", "compare_fsm", "as_sae_model", "save_sae"]


@dataclass
class CompareConfig(ValidatedConfig):
    """Settings of the TokFSM comparison."""

    RANGES: ClassVar[dict[str, Range]] = {
        "width": Range(1, 2**20),
        "k": Range(1, 2**10),
        "wide_factor": Range(1, 64),
        "large_k": Range(1, 2**10),
        "train_tokens": Range(1, 2**40),
        "eval_walks": Range(1, 2**20),
    }
    """Bounds of the numeric fields."""

    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)
    """The TokFSM demo's settings: its FSM, base model and finetuned codebooks."""

    sites: list[str] = field(
        default_factory=lambda: [
            "blocks.0.hook_mlp_out",
            "blocks.0.hook_resid_post",
            "blocks.0.attn.hook_z",
        ]
    )
    """Sites compared (``attn.hook_z`` flattened over heads: one dictionary)."""

    width: int = 1000
    """Dictionary width of the matched pair: the demo's codes per codebook."""

    k: int = 1
    """Active features of the matched pair: the demo's k."""

    wide_factor: int = 4
    """The wider SAE has ``wide_factor * width`` features (k unchanged)."""

    large_k: int = 4
    """The SAE with a larger k (width unchanged)."""

    train_tokens: int = 300_000
    """Training tokens of every dictionary (docs/results/codes_vs_saes.md compares 500k)."""

    eval_walks: int = 256
    """Held-out walks for explained variance, loss recovered and KL."""

    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    """Dictionary seeds (the base model is the demo's, seed ``experiment.seed``)."""

    @classmethod
    def small(cls) -> CompareConfig:
        """A minutes-long version on the demo's small TokFSM (for the slow test)."""
        return cls(
            experiment=ExperimentConfig.small(), width=32, wide_factor=2, large_k=2,
            train_tokens=20_000, eval_walks=32, seeds=[0, 1],
        )  # fmt: skip

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


def as_sae_model(model: nn.Module) -> HookedSAETransformer:
    """``model`` (a HookedTransformer) as a HookedSAETransformer with the same weights."""
    out = HookedSAETransformer(model.cfg)
    out.load_state_dict(model.state_dict())
    return out.eval()


def save_sae(sae: SAE, path: Path) -> None:
    """``sae`` in SAELens's layout (``cfg.json`` + ``sae_weights.safetensors``, what
    ``SAE.load_from_disk`` reads), each file written atomically."""
    state = {k: v.detach().contiguous() for k, v in sae.state_dict().items()}
    write_file(path / "sae_weights.safetensors", save(state))
    write_text(path / "cfg.json", json.dumps(sae.cfg.to_dict()))


def _measure(model, fsm, ecfg, spec, data, out: Path) -> dict[str, Any]:
    train, held_out, recovery = data
    t0 = time.perf_counter()
    sae = train_dictionary(model, train, spec)
    trained = time.perf_counter() - t0
    save_sae(sae, out / "saes" / spec.site / f"{spec.name.replace(' ', '-')}-seed{spec.seed}")
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


def compare_fsm(cfg: CompareConfig, out: Path, cache_dir: Path, log=print) -> dict[str, Any]:
    """Run the comparison seed by seed (every site of a seed before the next seed), rewriting
    ``out/results.json`` after every dictionary so that a stopped run keeps what it measured;
    the paper-setting row comes last. Returns what it wrote."""
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

    def write() -> None:
        result["seconds"] = time.perf_counter() - t0
        write_text(out / "results.json", json.dumps(result, indent=1))

    for seed in cfg.seeds:
        for site in cfg.sites:
            for spec in cfg.specs(site, seed):
                r = _measure(model, fsm, ecfg, spec, data, out)
                result["runs"].append(r)
                write()
                log(f"{site} {spec.name} seed {seed}: EV {r['explained_variance']:.3f}, "
                    f"states {r['states_recovered']}, success {r['intervention_success']:.3f} "
                    f"({r['seconds']:.0f} s)")  # fmt: skip
    result["paper_setting"] = _paper_setting(fsm, ecfg, cache_dir)
    write()
    return result
