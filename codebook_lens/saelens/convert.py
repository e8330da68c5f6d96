"""Between codebooks and SAELens SAEs: :func:`to_sae_lens` and :func:`codebook_from_sae`."""

from __future__ import annotations

from typing import Any

import torch
from sae_lens import SAE

from codebook_lens.config import CodebookConfig
from codebook_lens.model import CodebookModel
from codebook_lens.quantizer import Codebook
from codebook_lens.saelens.architecture import CodebookSAE, CodebookSAEConfig

__all__ = ["to_sae_lens", "codebook_from_sae"]

_FROM_SAE = ("d_in", "n_codes", "n_groups", "init")


def _blocks(cm: CodebookModel, site: str) -> tuple[int, bool]:
    """``(n_blocks, reshape_hook_z)`` of the codebook at ``site``."""
    layout, cfg = cm.site_layout(site), cm.codebook(site).cfg
    if layout in ("heads", "heads_flat") and not site.endswith("hook_z"):
        raise ValueError(
            f"{site} is a per-head site, and SAELens reshapes heads only at attn.hook_z; "
            "export a codebook at attn.hook_z or at a flat site (hook_mlp_out, hook_resid_*)"
        )
    if layout == "heads":
        return cm.cfg.n_heads, True
    return cfg.n_groups, layout == "heads_flat"


@torch.no_grad()
def to_sae_lens(cm: CodebookModel, site: str, model_name: str | None = None) -> CodebookSAE:
    """The codebook at ``site`` as a SAELens SAE of architecture ``"codebook"``.

    ``HookedSAETransformer.add_sae`` splices it in at ``site`` and the model then computes what
    ``cm`` computes with that codebook (per-head codebooks at ``attn.hook_z`` become one block
    diagonal dictionary over the flattened heads; a codebook shared by the heads is copied into
    every block). Feature ``b * n_codes + c`` is code ``c`` of head (or group) ``b``.
    ``model_name`` goes to ``cfg.metadata.model_name`` (default: ``cm.cfg.model_name``).
    """
    cb = cm.codebook(site)
    c = cb.cfg
    n_blocks, hook_z = _blocks(cm, site)
    cfg = CodebookSAEConfig(
        d_in=n_blocks * c.d_in,
        d_sae=n_blocks * c.n_codes,
        dtype=str(cb.codebook.dtype).removeprefix("torch."),
        device=str(cb.codebook.device),
        reshape_activations="hook_z" if hook_z else "none",
        n_codes=c.n_codes,
        k=c.k,
        n_blocks=n_blocks,
        similarity=c.similarity,
        combine=c.combine,
        input_norm=c.input_norm,
        norm_eps=c.norm_eps,
        chunk_mb=c.chunk_mb,
    )
    cfg.metadata.hook_name = site
    cfg.metadata.model_name = model_name or getattr(cm.cfg, "model_name", None)
    sae = CodebookSAE(cfg)
    sae.codebooks().copy_(cb.codebook.expand(n_blocks, -1, -1))
    if c.input_norm == "affine":
        sae.ln_weight.copy_(cb.ln_weight.expand(n_blocks, -1))
        sae.ln_bias.copy_(cb.ln_bias.expand(n_blocks, -1))
    return sae.eval()


@torch.no_grad()
def codebook_from_sae(sae: SAE, **overrides: Any) -> Codebook:
    """A codebook whose codes are ``sae``'s decoder rows (``init="sae"``); attach it at the SAE's
    hook with ``cm.add_codebook(sae.cfg.metadata.hook_name, codebook)``.

    From a :class:`CodebookSAE` this is the inverse of :func:`to_sae_lens`: the same codes,
    blocks and settings, so the model computes the same thing. From any other SAE, code ``i`` is
    feature ``i``'s decoder row (``n_codes = d_sae``; a hook_z SAE gives one codebook over the
    flattened heads); ``overrides`` set the other :class:`CodebookConfig` fields (``k``,
    ``similarity``, ...). What carries over is the dictionary: its directions and feature ids.
    What does not: the encoder (``W_enc``, ``b_enc``, thresholds: the codebook chooses the top k
    by similarity to the decoder rows), the activation magnitudes (a chosen code counts once,
    so ``decode`` is the sum of unscaled rows) and ``b_dec``. Finetune it before reading its
    reconstruction numbers.
    """
    fixed = sorted(set(overrides) & set(_FROM_SAE))
    if fixed:
        raise TypeError(f"codebook_from_sae sets {fixed} from the SAE; pass only other fields")
    if isinstance(sae, CodebookSAE):
        s = sae.cfg
        same = dict(k=s.k, similarity=s.similarity, combine=s.combine, input_norm=s.input_norm)
        same |= dict(norm_eps=s.norm_eps, chunk_mb=s.chunk_mb)
        cfg = CodebookConfig(
            d_in=s.block_size, n_codes=s.n_codes, n_groups=s.n_blocks, init="sae",
            **(same | overrides),
        )  # fmt: skip
        codes = sae.codebooks()
    else:
        cfg = CodebookConfig(d_in=sae.cfg.d_in, n_codes=sae.cfg.d_sae, init="sae", **overrides)
        codes = sae.W_dec[None]
    cb = Codebook(cfg)
    cb.codebook.copy_(codes)
    if cfg.input_norm == "affine" and isinstance(sae, CodebookSAE):
        cb.ln_weight.copy_(sae.ln_weight)
        cb.ln_bias.copy_(sae.ln_bias)
    return cb
