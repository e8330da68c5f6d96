"""Codes versus sparse autoencoders, side by side on the same frozen model (transformer-lens 3.x
with SAELens): ``python -m codebook_lens.compare --out DIR`` (docs/results/codes_vs_saes.md)."""

from codebook_lens.compare.dictionaries import DictionarySpec, site_width, train_dictionary
from codebook_lens.compare.run import CompareConfig, as_sae_model, compare_fsm
from codebook_lens.compare.splice import feature_store, splice_metrics

__all__ = [
    "CompareConfig",
    "DictionarySpec",
    "as_sae_model",
    "compare_fsm",
    "feature_store",
    "site_width",
    "splice_metrics",
    "train_dictionary",
]
