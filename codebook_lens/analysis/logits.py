"""Direct logit attribution (DLA) of code vectors.

A code's *residual vector* is what it writes into the residual stream directly: the code vector
itself at residual-width sites (``hook_resid_*``, ``hook_attn_out``, ``hook_mlp_out``,
``attn.hook_result``), through the head's ``W_O`` at ``attn.hook_z``, through ``W_out`` at
``mlp.hook_post``. Its direct logit attribution is that vector passed through the final
normalisation with the scale frozen (as ``ActivationCache.apply_ln_to_stack`` does: centre,
divide by the cached ``ln_final.hook_scale``, multiply by the LayerNorm weight; no bias) and the
unembedding ``W_U``. With a frozen scale this is exactly the change in the logits from adding
the code at a site of the last layer (validated in the tests).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import einops
import torch
from jaxtyping import Float, Int
from torch import Tensor

from codebook_lens.model import CodebookModel

__all__ = ["code_residual_vectors", "code_logit_attribution", "apply_final_ln"]

_RESID_SUFFIXES = (
    "hook_resid_pre",
    "hook_resid_mid",
    "hook_resid_post",
    "hook_attn_out",
    "hook_mlp_out",
    "attn.hook_result",
)


def _layer(site: str) -> int:
    m = re.match(r"blocks\.(\d+)\.", site)
    if not m:
        raise ValueError(f"{site!r} is not inside a block (blocks.<layer>....)")
    return int(m.group(1))


@torch.no_grad()
def code_residual_vectors(cm: CodebookModel, site: str) -> Float[Tensor, "head n_codes d_model"]:
    """What each code at ``site`` writes directly into the residual stream, per head/group.

    Includes the ``1/k`` of ``combine="mean"``. Per-head sites give one row per head (through
    that head's ``W_O`` at ``attn.hook_z``); grouped flat sites place each group's code in its
    slice of the vector.
    """
    cb = cm.codebook(site)
    layout = cm.site_layout(site)
    book = cb.codebook.detach()  # [G, N, d_in]
    if cb.cfg.combine == "mean":
        book = book / cb.cfg.k
    G, N, _ = book.shape
    if site.endswith("attn.hook_z"):
        W_O = cm.W_O[_layer(site)].detach()  # [H, d_head, d_model]
        H, dh, _ = W_O.shape
        if layout == "heads":
            b = book.expand(H, N, dh) if G == 1 else book
            return torch.einsum("hnd,hdm->hnm", b, W_O)
        heads = einops.rearrange(book[0], "n (h d) -> n h d", h=H)  # heads_flat
        return torch.einsum("nhd,hdm->nm", heads, W_O)[None]
    if site.endswith("mlp.hook_post"):
        W_out = cm.W_out[_layer(site)].detach()  # [d_mlp, d_model]
        if layout == "split":
            groups = einops.rearrange(W_out, "(g d) m -> g d m", g=G)
            return torch.einsum("gnd,gdm->gnm", book, groups)
        return (book[0] @ W_out)[None]
    if site.endswith(_RESID_SUFFIXES) or site in ("hook_embed", "hook_pos_embed"):
        if layout == "split":
            d = cb.cfg.d_in
            out = book.new_zeros(G, N, G * d)
            idx = torch.arange(G)
            out.view(G, N, G, d)[idx, :, idx] = book
            return out
        if layout == "heads" and G == 1:  # hook_result with a shared codebook
            return book.expand(cm.cfg.n_heads, N, book.shape[-1])
        if layout == "heads_flat":
            raise ValueError(
                f"{site} has one codebook over all heads' results; its codes have no direct "
                "residual vector per head"
            )
        return book
    raise ValueError(
        f"codes at {site!r} have no direct path to the residual stream; DLA is defined at "
        f"attn.hook_z, mlp.hook_post and residual-width sites ({', '.join(_RESID_SUFFIXES)})"
    )


def apply_final_ln(
    cm: CodebookModel, vectors: Float[Tensor, "... d_model"], scale: float | Tensor = 1.0
) -> Float[Tensor, "... d_model"]:
    """Residual vectors through the final normalisation with a frozen ``scale``: centre (LN),
    divide by ``scale``, multiply by the norm's weight (if any). No bias, as in TL's DLA."""
    norm = getattr(cm.cfg, "normalization_type", None)
    if norm is None:
        return vectors
    if norm in ("LN", "LNPre"):
        vectors = vectors - vectors.mean(-1, keepdim=True)
    vectors = vectors / torch.as_tensor(scale, dtype=vectors.dtype, device=vectors.device)
    w = getattr(cm.ln_final, "w", None)
    if w is None:
        w = getattr(cm.ln_final, "weight", None)
    if isinstance(w, Tensor) and norm in ("LN", "RMS"):
        vectors = vectors * w.detach()
    return vectors


@torch.no_grad()
def code_logit_attribution(
    cm: CodebookModel,
    site: str,
    tokens: int | Sequence[int] | Int[Tensor, " n_tokens"] | None = None,
    scale: float | Tensor = 1.0,
    codes: int | Sequence[int] | Int[Tensor, " n"] | None = None,
) -> Float[Tensor, "head n_codes n_tokens"]:
    """Direct logit attribution of each code at ``site``: its effect on the logits of ``tokens``
    (default: the whole vocabulary) through the unembedding, final norm scale frozen.

    Args:
        cm: A CodebookModel.
        site: The codebook's site.
        tokens: Target token ids (e.g. ``[correct, wrong]``; subtract for a logit difference).
        scale: The frozen final-norm scale: ``cache["ln_final.hook_scale"][b, p]`` for a
            specific position, or 1.0 for the unscaled direction.
        codes: Restrict to these code ids (the second axis follows their order).
    """
    vec = code_residual_vectors(cm, site)
    if codes is not None:
        idx = torch.as_tensor(codes, dtype=torch.long).reshape(-1)
        n = vec.shape[1]
        if idx.numel() and (int(idx.max()) >= n or int(idx.min()) < 0):
            raise IndexError(f"code ids must lie in [0, {n}); got {idx.tolist()}")
        vec = vec[:, idx.to(vec.device)]
    W_U = cm.W_U.detach()
    if tokens is not None:
        t = torch.as_tensor(tokens, dtype=torch.long).reshape(-1)
        if t.numel() and (int(t.max()) >= W_U.shape[1] or int(t.min()) < 0):
            raise IndexError(f"token ids must lie in [0, {W_U.shape[1]}); got {t.tolist()}")
        W_U = W_U[:, t.to(W_U.device)]
    return apply_final_ln(cm, vec, scale) @ W_U
