"""`CodebookConfig`: every knob of one codebook quantizer, validated on construction and on
every change of a field (types against the annotations, then ranges)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from codebook_lens.validation import ValidatedConfig

__all__ = [
    "CodebookConfig",
    "SIMILARITIES",
    "COMBINES",
    "INPUT_NORMS",
    "INIT_METHODS",
    "Similarity",
    "Combine",
    "InputNorm",
    "InitMethod",
]

Similarity = Literal["cosine", "dot", "euclidean"]
Combine = Literal["sum", "mean"]
InputNorm = Literal["none", "layernorm", "affine"]
InitMethod = Literal["random", "sample", "kmeans"]
SIMILARITIES: tuple[str, ...] = get_args(Similarity)
COMBINES: tuple[str, ...] = get_args(Combine)
INPUT_NORMS: tuple[str, ...] = get_args(InputNorm)
INIT_METHODS: tuple[str, ...] = get_args(InitMethod)


@dataclass
class CodebookConfig(ValidatedConfig):
    """Configuration of one codebook (or one group of per-head codebooks) at one site."""

    d_in: int
    """Size of the vectors being quantized (``d_model``, ``d_mlp`` or ``d_head``)."""

    n_codes: int
    """Number of code vectors per group (N in the paper; N >> k)."""

    k: int = 1
    """Number of codes active per position (and per group). Must satisfy 1 <= k <= n_codes."""

    n_groups: int = 1
    """Independent codebooks sharing one parameter ``[n_groups, n_codes, d_in]``; set it to
    ``n_heads`` for one codebook per attention head. With 1 at a per-head site, all heads share
    one codebook."""

    similarity: Similarity = "cosine"
    """How activations are compared with codes when choosing the top k: ``"cosine"`` (the
    default), ``"dot"`` or ``"euclidean"``."""

    combine: Combine = "sum"
    """How the k chosen code vectors are combined: ``"sum"`` (the paper) or ``"mean"`` (the
    reference implementation; divides by k, empty slots included)."""

    input_norm: InputNorm = "none"
    """Normalise the activation before comparing it with the codes (default ``"none"``). With
    ``"layernorm"`` the codes live in the normalised space and are what the model receives
    (much more stable for large-norm sites such as ``hook_mlp_out``). ``"affine"`` is a
    LayerNorm with a learned weight and bias per group (``ln_weight``/``ln_bias``
    ``[n_groups, d_in]``, initialised to 1 and 0), trained with the codebook's parameters and
    saved with them: the reference implementation's choice (``torch.nn.LayerNorm`` in each of
    its codebook layers)."""

    norm_eps: float = 1e-5
    """Epsilon of the input LayerNorm (``"layernorm"`` and ``"affine"``)."""

    use_error_term: bool = False
    """Add back ``a - quantized(a)`` (as SAELens's ``use_error_term``): downstream sees the exact
    activation, while interventions on codes still act through the change they make."""

    recon_coef: float = 1.0
    """Weight of the reconstruction loss ``||decode(codes) - a||^2`` that trains the codes."""

    commit_coef: float = 0.0
    """Weight of the commitment loss that pulls the activation towards its codes (VQ-VAE)."""

    init: InitMethod = "sample"
    """Code initialisation: ``"random"`` (Gaussian, on the unit sphere for cosine), ``"sample"``
    (random activations; the default) or ``"kmeans"`` (k-means on activations). Data-driven
    methods run when :meth:`CodebookModel.init_codebooks` is given tokens."""

    kmeans_iters: int = 10
    """Lloyd iterations for ``init="kmeans"``."""

    dead_code_threshold: float = 0.0
    """During training, a code used fewer than this many times since the last replacement is
    dead and is re-seeded from recent activations. 0 disables replacement."""

    merge_threshold: float = 0.0
    """During training, a used code whose cosine similarity to a more-used code exceeds this is
    parked (set to zero) so that its positions move to that code; 0 disables merging. See
    :func:`~codebook_lens.maintenance.merge_duplicate_codes`."""

    replace_every: int = 100
    """Training steps between codebook maintenance rounds: dead-code replacement (when
    ``dead_code_threshold > 0``) and merging (when ``merge_threshold > 0``)."""

    recent_size: int = 4096
    """Activations kept (per group) as seeds for dead-code replacement."""

    chunk_mb: float = 256.0
    """Memory budget in MiB for one chunk of the ``tokens x n_codes`` score matrix; scoring streams
    over tokens (and codes, if needed) so peak memory stays bounded."""

    seed: int = 0
    """Seed for code initialisation and dead-code replacement."""

    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form metadata saved with the codebook (not used by the library)."""

    def validate(self) -> None:
        """Range and cross-field checks (types and the ``Literal`` choices are checked against
        the annotations first, on construction and on every later assignment; see
        :mod:`codebook_lens.validation`)."""

        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(f"CodebookConfig: {msg}")

        for name in ("d_in", "n_codes", "k", "n_groups", "kmeans_iters", "replace_every"):
            v = getattr(self, name)
            need(v >= 1, f"{name} must be a positive int, got {v!r}")
        need(
            self.k <= self.n_codes,
            f"k={self.k} exceeds n_codes={self.n_codes}; choose k <= n_codes "
            "(the paper uses k << n_codes)",
        )
        for name in ("recon_coef", "commit_coef", "dead_code_threshold"):
            v = getattr(self, name)
            need(v >= 0, f"{name} must be >= 0, got {v!r}")
        need(
            0 <= self.merge_threshold < 1,
            f"merge_threshold must be in [0, 1) (a cosine similarity; 0 disables), got "
            f"{self.merge_threshold!r}",
        )
        need(self.chunk_mb > 0, f"chunk_mb must be > 0, got {self.chunk_mb!r}")
        need(self.norm_eps > 0, f"norm_eps must be > 0, got {self.norm_eps!r}")
        need(self.recent_size >= 0, f"recent_size must be >= 0, got {self.recent_size!r}")
        need(
            -(2**63) <= self.seed < 2**64,
            f"seed must lie in [-2**63, 2**64) (torch.Generator.manual_seed), got {self.seed!r}",
        )

    def replace(self, **changes: Any) -> CodebookConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)
