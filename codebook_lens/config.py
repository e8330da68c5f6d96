"""`CodebookConfig`: every knob of one codebook quantizer, validated on construction and on
every change of a field (types against the annotations, then ranges)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, get_args

from codebook_lens.validation import Range, ValidatedConfig

_POSITIVE = "a positive int"

__all__ = [
    "CodebookConfig",
    "MAX_CODEBOOK_ELEMENTS",
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
InitMethod = Literal["random", "sample", "kmeans", "sae"]
SIMILARITIES: tuple[str, ...] = get_args(Similarity)
COMBINES: tuple[str, ...] = get_args(Combine)
INPUT_NORMS: tuple[str, ...] = get_args(InputNorm)
INIT_METHODS: tuple[str, ...] = get_args(InitMethod)

MAX_CODEBOOK_ELEMENTS = 2**32
"""The largest ``n_groups * n_codes * d_in`` (and ``recent_size * n_groups * d_in``) a
:class:`CodebookConfig` accepts: 16 GiB of float32, four times that with AdamW's moments and the
gradient. Larger sizes are refused when the config is built, before anything is allocated."""


@dataclass
class CodebookConfig(ValidatedConfig):
    """Configuration of one codebook (or one group of per-head codebooks) at one site.

    Ranges (checked on construction and on every assignment, see :attr:`RANGES`): sizes are
    bounded by what can be allocated, ``n_groups * n_codes * d_in <= 2**32`` and
    ``recent_size * n_groups * d_in <= 2**32`` (:data:`MAX_CODEBOOK_ELEMENTS`); ``chunk_mb`` lies
    in ``[1/64, 65536]`` MiB and gives each group at least 256 float32 scores per tile
    (``chunk_mb >= n_groups / 1024``), so scoring can neither crawl (at the lower bound it is
    about 10x slower than the default, measured) nor overflow; coefficients lie in
    ``[0, 1e6]``."""

    RANGES: ClassVar[dict[str, Range]] = {
        "d_in": Range(1, 2**20, what=_POSITIVE),
        "n_codes": Range(1, 2**31 - 1, what=_POSITIVE),
        "k": Range(1, None, what=_POSITIVE),  # <= min(n_codes, 2**16): validate()
        "n_groups": Range(1, 2**16, what=_POSITIVE),
        "norm_eps": Range(0, 1, lo_open=True),
        "recon_coef": Range(0, 1e6),
        "commit_coef": Range(0, 1e6),
        "kmeans_iters": Range(1, 10**6, what=_POSITIVE),
        "dead_code_threshold": Range(0, 2**53),
        "replace_every": Range(1, 10**9, what=_POSITIVE),
        "recent_size": Range(0, 2**31 - 1),
        "chunk_mb": Range(1 / 64, 65536),
        "seed": Range(-(2**63), 2**64, hi_open=True),
    }
    """Bounds of the numeric fields (torch.Generator seeds are 64-bit)."""

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
    (random activations; the default), ``"kmeans"`` (k-means on activations) or ``"sae"`` (the
    codes are a sparse autoencoder's decoder rows, set by
    :func:`codebook_lens.saelens.codebook_from_sae`). Data-driven methods run when
    :meth:`CodebookModel.init_codebooks` is given tokens; ``"random"`` and ``"sae"`` codes are
    left as they are."""

    kmeans_iters: int = 10
    """Lloyd iterations for ``init="kmeans"``."""

    dead_code_threshold: float = 0.0
    """During training, a code used fewer than this many times since the last replacement is
    dead and is re-seeded from recent activations. 0 disables replacement."""

    merge_threshold: float = 0.0
    """During training, a used code whose cosine similarity to a more-used code exceeds this is
    parked (set to zero) so that its positions move to that code; 0 disables merging. See
    :meth:`~codebook_lens.quantizer.Codebook.merge_duplicate_codes`."""

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

        need(
            self.k <= self.n_codes,
            f"k={self.k} exceeds n_codes={self.n_codes}; choose k <= n_codes "
            "(the paper uses k << n_codes)",
        )
        need(self.k <= 2**16, f"k must lie in [1, 65536], got {self.k}")
        need(
            0 <= self.merge_threshold < 1,
            f"merge_threshold must be in [0, 1) (a cosine similarity; 0 disables), got "
            f"{self.merge_threshold!r}",
        )
        g, n, d = self.n_groups, self.n_codes, self.d_in
        need(
            g * n * d <= MAX_CODEBOOK_ELEMENTS,
            f"n_groups * n_codes * d_in = {g} * {n} * {d} = {g * n * d} exceeds the limit of "
            f"2**32 = {MAX_CODEBOOK_ELEMENTS} elements (16 GiB of float32); use fewer codes or "
            "groups",
        )
        need(
            self.recent_size * g * d <= MAX_CODEBOOK_ELEMENTS,
            f"recent_size * n_groups * d_in = {self.recent_size} * {g} * {d} = "
            f"{self.recent_size * g * d} exceeds the limit of 2**32 elements; lower recent_size",
        )
        need(
            self.chunk_mb * 1024 >= g,
            f"chunk_mb={self.chunk_mb!r} gives n_groups={g} fewer than 256 float32 scores each per "
            f"tile, which makes scoring crawl; use chunk_mb at least {g / 1024!r}",
        )

    def replace(self, **changes: Any) -> CodebookConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)
