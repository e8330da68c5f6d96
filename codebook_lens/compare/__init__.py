"""Codes versus sparse autoencoders, side by side on the same frozen models (transformer-lens 3.x
with SAELens): ``python -m codebook_lens.compare --out DIR`` (docs/results/codes_vs_saes.md)."""

from codebook_lens.compare.dictionaries import (
    DictionarySpec,
    as_sae_model,
    save_sae,
    site_width,
    train_dictionary,
)
from codebook_lens.compare.fsm_run import FSMCompareConfig, compare_fsm
from codebook_lens.compare.grid import DictionaryGrid
from codebook_lens.compare.lm_run import LMCompareConfig, compare_lm
from codebook_lens.compare.splice import feature_store, mean_active_values, splice_metrics

__all__ = [
    "DictionaryGrid",
    "DictionarySpec",
    "FSMCompareConfig",
    "LMCompareConfig",
    "as_sae_model",
    "compare_fsm",
    "compare_lm",
    "feature_store",
    "mean_active_values",
    "save_sae",
    "site_width",
    "splice_metrics",
    "train_dictionary",
]
