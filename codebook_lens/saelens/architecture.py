"""The SAELens architecture ``"codebook"``: a codebook as a SAELens ``SAE``.

A codebook is a dictionary whose features are on or off. As an SAE, the codebook's input is
split into ``n_blocks`` equal blocks (one per attention head at ``attn.hook_z``, one per group of
a split codebook, a single block otherwise); feature ``b * n_codes + c`` is code ``c`` of block
``b``, and its ``W_dec`` row is that code's vector placed in block ``b`` (``W_dec`` is block
diagonal). ``encode`` chooses the codes with the codebook's own top-k kernel
(:func:`codebook_lens.topk.topk_codes`) against the diagonal blocks of ``W_dec``, not by a top-k
over ``x @ W_enc``: near-duplicate codes would otherwise flip. Each chosen code gets 1 (``1/k``
with ``combine="mean"``), so ``decode`` is exactly the codebook's output. With an input norm the
SAE normalises each block as the codebook does and does not undo it.

Importing this module registers the architecture with SAELens's in-process registry, which is
where ``SAE.load_from_disk`` looks: import ``codebook_lens.saelens`` before loading a saved one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NoReturn

import torch
import torch.nn.functional as F
from jaxtyping import Float
from sae_lens import SAE, SAEConfig
from sae_lens.registry import SAE_CLASS_REGISTRY, register_sae_class
from sae_lens.saes.sae import SAEMetadata
from torch import Tensor, nn

from codebook_lens.config import COMBINES, INPUT_NORMS, SIMILARITIES
from codebook_lens.topk import Workspace, topk_codes

__all__ = ["ARCHITECTURE", "CodebookSAE", "CodebookSAEConfig"]

ARCHITECTURE = "codebook"
"""The name SAELens knows this architecture by (``cfg.json``'s ``"architecture"``)."""


@dataclass
class CodebookSAEConfig(SAEConfig):
    """SAELens config of a codebook: ``d_in = n_blocks * block size``, ``d_sae = n_blocks *
    n_codes``. The code-choice fields mean what they mean in
    :class:`~codebook_lens.config.CodebookConfig`."""

    n_codes: int = 1
    """Codes per block."""

    k: int = 1
    """Codes chosen per position and block."""

    n_blocks: int = 1
    """Equal blocks of the input, each quantized on its own (heads, or a split codebook's
    groups)."""

    similarity: str = "cosine"
    """How codes are scored against the (normalised) block: cosine, dot or euclidean."""

    combine: str = "sum"
    """``"sum"``: a chosen code's feature activation is 1; ``"mean"``: ``1/k``."""

    input_norm: str = "none"
    """The codebook's input normalisation: none, layernorm or affine (learned per block)."""

    norm_eps: float = 1e-5
    """Epsilon of the input LayerNorm."""

    chunk_mb: float = 256.0
    """Memory budget of one score tile of the top-k kernel, in MiB."""

    metadata: SAEMetadata | dict[str, Any] = field(default_factory=SAEMetadata)
    """Model name, hook name, ...; a dict (what ``SAEConfig.from_dict`` passes) is converted."""

    apply_b_dec_to_input: bool = False
    """Always False: a codebook has no input bias (``b_dec`` stays zero)."""

    @classmethod
    def architecture(cls) -> str:
        """``"codebook"``."""
        return ARCHITECTURE

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.metadata, dict):
            self.metadata = SAEMetadata(**self.metadata)
        choices = {"similarity": SIMILARITIES, "combine": COMBINES, "input_norm": INPUT_NORMS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r}; choose one of {allowed}")
        if min(self.n_codes, self.k, self.n_blocks) < 1 or self.k > self.n_codes:
            raise ValueError(
                f"need 1 <= k <= n_codes and n_blocks >= 1; got k={self.k}, "
                f"n_codes={self.n_codes}, n_blocks={self.n_blocks}"
            )
        if self.d_in % self.n_blocks or self.d_sae != self.n_blocks * self.n_codes:
            raise ValueError(
                f"d_in={self.d_in} must split into n_blocks={self.n_blocks} equal blocks and "
                f"d_sae={self.d_sae} must equal n_blocks * n_codes = "
                f"{self.n_blocks * self.n_codes}"
            )
        if self.apply_b_dec_to_input or self.normalize_activations != "none":
            raise ValueError(
                "a codebook SAE takes its input as the codebook does: apply_b_dec_to_input=False "
                "and normalize_activations='none' (use input_norm for the codebook's own norm)"
            )

    @property
    def block_size(self) -> int:
        """Size of one block (``d_in / n_blocks``)."""
        return self.d_in // self.n_blocks


class CodebookSAE(SAE[CodebookSAEConfig]):
    """A codebook as a SAELens SAE (inference only): see the module docstring.

    Parameters: ``W_dec [d_sae, d_in]`` (block diagonal: the code vectors), ``b_dec [d_in]``
    (zero), and with ``input_norm="affine"`` ``ln_weight``/``ln_bias [n_blocks, block_size]``.
    There is no ``W_enc``: codes are chosen by similarity to the ``W_dec`` blocks.
    """

    def __init__(self, cfg: CodebookSAEConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)
        self.workspace = Workspace()

    def initialize_weights(self) -> None:
        """Zero ``W_dec``/``b_dec`` and an identity affine norm (``to_sae_lens`` fills them)."""
        cfg, kw = self.cfg, {"dtype": self.dtype, "device": self.device}
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in, **kw))
        self.W_dec = nn.Parameter(torch.zeros(cfg.d_sae, cfg.d_in, **kw))
        if cfg.input_norm == "affine":
            self.ln_weight = nn.Parameter(torch.ones(cfg.n_blocks, cfg.block_size, **kw))
            self.ln_bias = nn.Parameter(torch.zeros(cfg.n_blocks, cfg.block_size, **kw))

    def __getattr__(self, name: str) -> Any:
        if name == "W_enc":  # here, not a property: nn.Module would replace its message
            raise AttributeError(
                "a codebook SAE has no linear encoder W_enc: encode() chooses the top-k codes by "
                "similarity to the blocks of W_dec (see codebooks()); use encode() for features"
            )
        return super().__getattr__(name)

    def codebooks(self) -> Float[Tensor, "n_blocks n_codes block_size"]:
        """The code vectors of each block: the diagonal blocks of ``W_dec`` (a view)."""
        b, n, d = self.cfg.n_blocks, self.cfg.n_codes, self.cfg.block_size
        return self.W_dec.view(b, n, b, d).diagonal(dim1=0, dim2=2).permute(2, 0, 1)

    def normalize_blocks(
        self, x: Float[Tensor, "rows n_blocks block_size"]
    ) -> Float[Tensor, "rows n_blocks block_size"]:
        """Each block as its codes see it (the codebook's ``input_norm``)."""
        cfg = self.cfg
        if cfg.input_norm == "none":
            return x
        x = F.layer_norm(x, (cfg.block_size,), eps=cfg.norm_eps)
        if cfg.input_norm == "affine":
            x = x * self.ln_weight.to(x.dtype) + self.ln_bias.to(x.dtype)
        return x

    def encode(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]:
        """Feature activations: 1 (``1/k`` with ``combine="mean"``) for each chosen code, 0
        elsewhere; a block whose input is not finite gets no codes, as in the codebook."""
        cfg = self.cfg
        sae_in = self.process_sae_in(x)
        blocks = self.normalize_blocks(sae_in.reshape(-1, cfg.n_blocks, cfg.block_size))
        with torch.no_grad():
            ids = topk_codes(
                blocks.detach(),
                self.codebooks().detach(),
                cfg.k,
                cfg.similarity,  # type: ignore[arg-type]
                cfg.chunk_mb,
                self.workspace,
            )
            finite = torch.isfinite(blocks.sum(-1, dtype=torch.float32))
        value = 1.0 / cfg.k if cfg.combine == "mean" else 1.0
        acts = sae_in.new_zeros(blocks.shape[0], cfg.n_blocks, cfg.n_codes)
        acts.scatter_(-1, ids, value)
        acts = acts * finite[..., None].to(acts.dtype)
        return self.hook_sae_acts_post(acts.reshape(*sae_in.shape[:-1], cfg.d_sae))

    def decode(self, feature_acts: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... d_in"]:
        """``feature_acts @ W_dec + b_dec``: the sum (or mean) of the chosen code vectors."""
        out = self.hook_sae_recons(feature_acts @ self.W_dec + self.b_dec)
        out = self.run_time_activation_norm_fn_out(out)
        return self.reshape_fn_out(out, self.d_head)

    def fold_W_dec_norm(self) -> NoReturn:  # noqa: N802 - SAELens's name
        raise NotImplementedError(_NO_FOLD)

    def fold_activation_norm_scaling_factor(self, scaling_factor: float) -> NoReturn:
        raise NotImplementedError(_NO_FOLD)

    def fold_activation_whitening(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise NotImplementedError(_NO_FOLD)


_NO_FOLD = (
    "a codebook SAE cannot fold a scale into its weights: rescaling the code vectors changes "
    "which codes win the top-k and what decode returns; scale the activations instead"
)

if ARCHITECTURE not in SAE_CLASS_REGISTRY:  # a second import (or reload) keeps the first
    register_sae_class(ARCHITECTURE, CodebookSAE, CodebookSAEConfig)
