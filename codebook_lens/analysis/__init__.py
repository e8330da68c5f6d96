"""Analysis toolkit: code stores, code-feature attribution, the neuron baseline, logit
attribution, attribution patching, causal patching hooks, sweeps and steering.

Everything is vectorized (bincount / scatter / sort) and memory-bounded, and the patching hooks
are plain TransformerLens hook functions for ``f"{site}.hook_codes"``.
"""

from codebook_lens.analysis.attribution import (
    AttributionResult,
    BestCodes,
    RankedCodes,
    attribution_by_site,
    best_codes_per_label,
    feature_attribution,
    joint_counts,
    label_attribution,
    rank_codes,
    recovered_labels,
)
from codebook_lens.analysis.attribution_patching import CodeAttribution, code_attribution_patching
from codebook_lens.analysis.collect import collect_codes
from codebook_lens.analysis.examples import (
    CodeExamples,
    CodeTokenTable,
    code_token_table,
    top_examples,
)
from codebook_lens.analysis.features import regex_feature, token_feature, token_strings
from codebook_lens.analysis.logits import (
    apply_final_ln,
    code_logit_attribution,
    code_residual_vectors,
)
from codebook_lens.analysis.neurons import (
    NeuronBaselineResult,
    collect_activations,
    neuron_baseline,
)
from codebook_lens.analysis.patching import (
    ablate_codes,
    force_codes,
    patch_codes,
    select_mask,
    set_codes,
)
from codebook_lens.analysis.steering import SteeringResult, steer, steering_hooks
from codebook_lens.analysis.store import CodeStore, dedupe_slots, smallest_int_dtype
from codebook_lens.analysis.sweeps import SweepResult, ablation_sweep, patch_sweep

__all__ = [
    # store
    "CodeStore",
    "collect_codes",
    "smallest_int_dtype",
    "dedupe_slots",
    # features
    "token_feature",
    "regex_feature",
    "token_strings",
    # attribution
    "AttributionResult",
    "RankedCodes",
    "BestCodes",
    "joint_counts",
    "label_attribution",
    "feature_attribution",
    "attribution_by_site",
    "rank_codes",
    "best_codes_per_label",
    "recovered_labels",
    # examples
    "CodeExamples",
    "CodeTokenTable",
    "top_examples",
    "code_token_table",
    # neurons
    "NeuronBaselineResult",
    "neuron_baseline",
    "collect_activations",
    # logits
    "code_residual_vectors",
    "code_logit_attribution",
    "apply_final_ln",
    # attribution patching
    "CodeAttribution",
    "code_attribution_patching",
    # patching hooks
    "ablate_codes",
    "force_codes",
    "set_codes",
    "patch_codes",
    "select_mask",
    # sweeps
    "SweepResult",
    "ablation_sweep",
    "patch_sweep",
    # steering
    "SteeringResult",
    "steer",
    "steering_hooks",
]
