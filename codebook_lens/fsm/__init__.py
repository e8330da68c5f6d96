"""TokFSM: the synthetic finite-state-machine language of the Codebook Features paper.

A random FSM (:class:`FSM`), seeded random-walk datasets (:mod:`.data`), base-model training
(:mod:`.base_model`) and metrics (:mod:`.metrics`): transition accuracy of sampled
continuations and exact next-state distributions. Nothing runs at import time.
"""

from codebook_lens.fsm.base_model import (
    BaseTrainConfig,
    History,
    base_model_config,
    loss_floor,
    sinusoidal_positions,
    train_base_model,
)
from codebook_lens.fsm.data import (
    TokFSMStream,
    eval_set,
    sample_walks,
    sample_walks_ending_in,
    state_labels,
    walks_to_tokens,
)
from codebook_lens.fsm.machine import FSM, n_digits_for
from codebook_lens.fsm.metrics import (
    evaluate_next_state_jsd,
    evaluate_transition_accuracy,
    infer_n_ctx,
    jsd,
    next_state_distribution,
    sample_continuations,
    transition_accuracy,
    true_next_state_distribution,
)
from codebook_lens.fsm.reference import save_reference_fsm

__all__ = [
    "FSM",
    "BaseTrainConfig",
    "History",
    "TokFSMStream",
    "base_model_config",
    "eval_set",
    "evaluate_next_state_jsd",
    "evaluate_transition_accuracy",
    "infer_n_ctx",
    "jsd",
    "loss_floor",
    "n_digits_for",
    "next_state_distribution",
    "sample_continuations",
    "sample_walks",
    "sample_walks_ending_in",
    "save_reference_fsm",
    "sinusoidal_positions",
    "state_labels",
    "train_base_model",
    "transition_accuracy",
    "true_next_state_distribution",
    "walks_to_tokens",
]
